package relay

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/internal/ident"
)

// maxRetryBackoff bounds relay.retry_min_backoff and retry_max_backoff: the
// delay is doubled in time.Duration and added to now() in SQL, which must
// not overflow.
const maxRetryBackoff = 24 * time.Hour

// FieldError is a configuration error naming the offending key.
type FieldError struct {
	Key     string // e.g. "relay.batch_size"
	Problem string // what is wrong and what is allowed
}

// Error reads "key: problem".
func (e *FieldError) Error() string { return e.Key + ": " + e.Problem }

// Validate checks a config that has had WithDefaults applied and returns
// every problem found, each a *FieldError naming its key.
func (c Config) Validate() error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, &FieldError{Key: key, Problem: fmt.Sprintf(format, args...)})
	}
	// Blank is missing: pgx would otherwise connect to its own defaults.
	if strings.TrimSpace(c.Postgres.DSN) == "" {
		bad("postgres.dsn", "required: a PostgreSQL URL such as postgres://user@host:5432/db (env OUTBOX_RELAY_POSTGRES_DSN)")
	} else if _, err := pgx.ParseConfig(c.Postgres.DSN); err != nil {
		bad("postgres.dsn", "cannot be parsed: %s", Redact(err.Error()))
	}
	if err := ident.Validate(c.Postgres.Schema); err != nil {
		bad("postgres.schema", "%v", err)
	}
	if err := ident.Validate(c.Postgres.Table); err != nil {
		bad("postgres.table", "%v", err)
	}
	if c.Postgres.MaxConns < 1 {
		bad("postgres.max_conns", "must be at least 1, got %d", c.Postgres.MaxConns)
	}
	oneOf(bad, "postgres.pooler", c.Postgres.Pooler, PoolerNone, PoolerTransaction)
	if c.Postgres.QueryExecMode != "" {
		if _, ok := queryExecModes[c.Postgres.QueryExecMode]; !ok {
			bad("postgres.query_exec_mode", "must be one of %q, got %q", queryExecModeNames(), c.Postgres.QueryExecMode)
		}
	}
	c.validatePooler(bad)
	validateURLs(bad, c.AMQP.URL)
	if strings.TrimSpace(c.AMQP.Exchange) == "" {
		bad("amqp.exchange", "required: the exchange events are published to (env OUTBOX_RELAY_AMQP_EXCHANGE)")
	}
	switch c.AMQP.ExchangeType {
	case "topic", "direct", "fanout", "headers":
	default:
		bad("amqp.exchange_type", "must be topic, direct, fanout or headers, got %q", c.AMQP.ExchangeType)
	}
	if c.AMQP.ConfirmTimeout < 0 {
		bad("amqp.confirm_timeout", "must be positive, got %s", c.AMQP.ConfirmTimeout)
	}
	if c.AMQP.MaxUnconfirmed < 1 {
		bad("amqp.max_unconfirmed", "must be at least 1 (the most messages awaiting the broker's confirm; default %d), got %d", DefaultMaxUnconfirmed, c.AMQP.MaxUnconfirmed)
	}
	if c.AMQP.MaxMessageSize < 1 {
		bad("amqp.max_message_size", "must be a positive number of bytes, got %d", c.AMQP.MaxMessageSize)
	}
	oneOf(bad, "amqp.unroutable", c.AMQP.Unroutable, UnroutableFail, UnroutableAccept)
	for i, x := range c.AMQP.Exchanges {
		if x == "" || len(x) > maxShortString {
			bad(fmt.Sprintf("amqp.exchanges[%d]", i), "must be an exchange name of 1 to %d bytes, got %q", maxShortString, x)
		}
	}
	oneOf(bad, "amqp.format", c.AMQP.Format, FormatPlain, FormatCloudEventsBinary, FormatCloudEventsStructured)
	if c.AMQP.Format != FormatPlain {
		if err := validSource(c.AMQP.CloudEventsSource); err != nil {
			bad("amqp.cloudevents_source", "%v (required with amqp.format %s; env OUTBOX_RELAY_AMQP_CLOUDEVENTS_SOURCE)", err, c.AMQP.Format)
		}
	}
	if len(c.AMQP.AppID) > maxShortString {
		bad("amqp.app_id", "must be at most %d bytes, got %d", maxShortString, len(c.AMQP.AppID))
	}
	if c.Relay.BatchSize < 1 || c.Relay.BatchSize > 10000 {
		bad("relay.batch_size", "must be between 1 and 10000, got %d", c.Relay.BatchSize)
	}
	if c.Relay.BatchBytes < 1<<10 || c.Relay.BatchBytes > 1<<30 {
		bad("relay.batch_bytes", "must be between 1024 and 1073741824 bytes (1 KiB to 1 GiB), got %d", c.Relay.BatchBytes)
	}
	oneOf(bad, "relay.on_dispatch", c.Relay.OnDispatch, OnDispatchMark, OnDispatchDelete)
	if c.Relay.MaxAttempts < 1 {
		bad("relay.max_attempts", "must be at least 1, got %d", c.Relay.MaxAttempts)
	}
	positive(bad, "relay.retry_min_backoff", c.Relay.RetryMinBackoff)
	positive(bad, "relay.retry_max_backoff", c.Relay.RetryMaxBackoff)
	if c.Relay.RetryMaxBackoff > maxRetryBackoff {
		bad("relay.retry_max_backoff", "must be at most %s (a longer wait is better served by `outbox-relay dead retry` later), got %s", maxRetryBackoff, c.Relay.RetryMaxBackoff)
	}
	if c.Relay.RetryMinBackoff > maxRetryBackoff {
		bad("relay.retry_min_backoff", "must be at most %s, got %s", maxRetryBackoff, c.Relay.RetryMinBackoff)
	}
	if c.Relay.RetryMaxBackoff < c.Relay.RetryMinBackoff {
		bad("relay.retry_max_backoff", "must not be below relay.retry_min_backoff (%s), got %s", c.Relay.RetryMinBackoff, c.Relay.RetryMaxBackoff)
	}
	positive(bad, "relay.shutdown_timeout", c.Relay.ShutdownTimeout)
	positive(bad, "relay.stats_interval", c.Relay.StatsInterval)
	oneOf(bad, "relay.ordering", c.Relay.Ordering, OrderingNone, OrderingPartitionKey)
	if c.Relay.Partitions < 1 || c.Relay.Partitions > 4096 {
		bad("relay.partitions", "must be between 1 and 4096, got %d", c.Relay.Partitions)
	}
	if c.Relay.LeaseTimeout < time.Second || c.Relay.LeaseTimeout > time.Hour {
		bad("relay.lease_timeout", "must be between 1s and 1h, got %s", c.Relay.LeaseTimeout)
	}
	oneOf(bad, "relay.on_dead", c.Relay.OnDead, OnDeadContinue, OnDeadBlock)
	positive(bad, "retention.dispatched", c.Retention.Dispatched)
	if c.Retention.Dead < 0 {
		bad("retention.dead", "must be 0 (keep dead rows until an operator acts) or a positive duration, got %s", c.Retention.Dead)
	}
	positive(bad, "retention.interval", c.Retention.Interval)
	if c.Retention.BatchSize < 1 || c.Retention.BatchSize > 100000 {
		bad("retention.batch_size", "must be between 1 and 100000, got %d", c.Retention.BatchSize)
	}
	oneOf(bad, "wake.mode", c.Wake.Mode, WakePoll, WakeNotify)
	positive(bad, "wake.poll_interval", c.Wake.PollInterval)
	positive(bad, "wake.min_interval", c.Wake.MinInterval)
	if c.Wake.MinInterval > c.Wake.PollInterval {
		bad("wake.min_interval", "must not exceed wake.poll_interval (%s), got %s", c.Wake.PollInterval, c.Wake.MinInterval)
	}
	if c.Wake.Linger < c.Wake.MinInterval || c.Wake.Linger > c.Wake.PollInterval {
		bad("wake.linger", "must be between wake.min_interval (%s, which turns lingering off) and wake.poll_interval (%s), got %s",
			c.Wake.MinInterval, c.Wake.PollInterval, c.Wake.Linger)
	}
	if c.Wake.LingerAbove < 1 {
		bad("wake.linger_above", "must be a claim rate of at least 1 event/s, got %d", c.Wake.LingerAbove)
	}
	return errors.Join(errs...)
}

func oneOf(bad func(string, string, ...any), key, got string, allowed ...string) {
	for _, a := range allowed {
		if got == a {
			return
		}
	}
	bad(key, "must be one of %q, got %q", allowed, got)
}

func positive(bad func(string, string, ...any), key string, d time.Duration) {
	if d <= 0 {
		bad(key, "must be a positive duration such as 500ms or 10s, got %s", d)
	}
}
