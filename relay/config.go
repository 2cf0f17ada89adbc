package relay

import (
	"cmp"
	"os"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/ident"
)

// Config configures the relay engine. The yaml names are the keys of the
// configuration file (see config.example.yaml, which documents every key);
// zero values take the defaults below.
type Config struct {
	Postgres  PostgresConfig  `yaml:"postgres"`  // the outbox table and how to reach it
	AMQP      AMQPConfig      `yaml:"amqp"`      // the broker and how events become messages
	Relay     EngineConfig    `yaml:"relay"`     // the claim loop
	Wake      WakeConfig      `yaml:"wake"`      // how the relay learns that rows wait
	Retention RetentionConfig `yaml:"retention"` // the cleaner of old rows
}

// RetentionConfig bounds the table: a background cleaner deletes old
// dispatched and dead rows in small batches, apart from the claim loop.
type RetentionConfig struct {
	// Enabled runs the cleaner. Default true; set false when something else
	// deletes old rows or the relay's role may not DELETE from the archive.
	Enabled *bool `yaml:"enabled"`
	// Dispatched is how long dispatched rows are kept in the archive (for
	// replay and audit) before the cleaner deletes them. Default 168h (7
	// days). Not used with relay.on_dispatch: delete.
	Dispatched time.Duration `yaml:"dispatched"`
	// Dead is how long dead rows are kept. Default 0: until an operator
	// retries or purges them.
	Dead time.Duration `yaml:"dead"`
	// Interval between cleaner runs. Default 1m.
	Interval time.Duration `yaml:"interval"`
	// BatchSize is the most rows one cleaner statement deletes (and, for
	// rows an older relay marked in place in the outbox table, reads: a page
	// of the table in seq order). Default 1000.
	BatchSize int `yaml:"batch_size"`
}

// PostgresConfig locates the outbox table.
type PostgresConfig struct {
	// DSN is a libpq URL or key=value string. Required.
	DSN string `yaml:"dsn"`
	// Schema of the outbox table. Default "public".
	Schema string `yaml:"schema"`
	// Table is the outbox table's name. Default "outbox".
	Table string `yaml:"table"`
	// MaxConns bounds the relay's pool (the LISTEN and lease connections are
	// extra). Up to MaxConns-2 (at most 4) sent batches await their confirms
	// at once, each on a connection of its own, while the next is sent.
	// Default 4 (2 batches awaiting, 3 in flight).
	MaxConns int32 `yaml:"max_conns"`
	// Pooler says what is between the relay and PostgreSQL: "none" (default:
	// PostgreSQL itself or a session-mode pool) or "transaction" (PgBouncer
	// or another pooler in transaction mode, where a session lasts one
	// transaction). With "transaction", settings that need a session
	// (wake.mode: notify, migrations) are refused at start with the fix.
	Pooler string `yaml:"pooler"`
	// QueryExecMode is how pgx sends queries: "cache_describe" (default:
	// unnamed statements, result types cached; works through any pooler),
	// "cache_statement" (named prepared statements, which a pooler in
	// transaction mode carries only from PgBouncer 1.21 with
	// max_prepared_statements set), "describe_exec", "exec" or
	// "simple_protocol". When unset, the DSN's default_query_exec_mode if it
	// has one.
	QueryExecMode string `yaml:"query_exec_mode"`
}

// AMQPConfig says where and how events are published.
type AMQPConfig struct {
	// URL of the broker, amqp:// or amqps://. Required. Several URLs, the
	// nodes of a cluster, are separated by commas (in YAML, a list also
	// does): the relay connects to the first that answers, in order, and
	// moves on to the next when its node fails.
	URL string `yaml:"url"`
	// Exchange events are published to. Required; "" (the default exchange) is
	// not allowed because it routes by queue name, not event type.
	Exchange string `yaml:"exchange"`
	// ExchangeType is used when the relay declares the exchange. Default "topic".
	ExchangeType string `yaml:"exchange_type"`
	// DeclareExchange makes the relay declare the exchange (durable) at connect.
	// Default true; set false when the exchange is managed elsewhere or the
	// relay's user lacks configure permission. When false, connecting checks
	// that the exchange exists (a passive declare) and fails until it does.
	DeclareExchange *bool `yaml:"declare_exchange"`
	// Exchanges lists the other exchanges a row may name in its exchange
	// column (a per-row override of Exchange). They are declared or checked
	// at connect like Exchange, so a publish never closes the channel over a
	// missing one; a row naming an exchange not listed here is parked dead
	// (reason invalid). Default none: every event goes to Exchange.
	Exchanges []string `yaml:"exchanges"`
	// ConfirmTimeout bounds the wait for the broker's confirms of one batch.
	// Default 30s.
	ConfirmTimeout time.Duration `yaml:"confirm_timeout"`
	// MaxUnconfirmed is the most messages published and awaiting the
	// broker's confirm; once that many await, the relay publishes the next
	// messages when half of them are confirmed. With fewer messages
	// outstanding RabbitMQ spends less CPU on each (about half at 100 as at
	// 500 or more, with a consumer keeping up; docs/benchmarks.md, "The
	// broker's confirm window").
	// Default 100.
	MaxUnconfirmed int `yaml:"max_unconfirmed"`
	// MaxMessageSize is the broker's max_message_size: larger payloads are
	// parked dead at once instead of being sent (RabbitMQ would close the
	// channel). Default 134217728 (128 MiB, RabbitMQ's default).
	MaxMessageSize int `yaml:"max_message_size"`
	// Unroutable says what a basic.return (no queue bound for the routing key)
	// means: "fail" (default) retries the event and parks it dead after
	// relay.max_attempts; "accept" counts it as delivered, for exchanges that
	// have an alternate exchange.
	Unroutable string `yaml:"unroutable"`
	// Format is how an event becomes a message: "plain" (default: the
	// payload is the body, see the README's wire contract),
	// "cloudevents-binary" (CloudEvents attributes in cloudEvents:* headers,
	// the payload as the body) or "cloudevents-structured" (the body is an
	// application/cloudevents+json document carrying the payload). See
	// docs/cloudevents.md.
	Format string `yaml:"format"`
	// CloudEventsSource is the CloudEvents source attribute (a URI-reference
	// naming the producer, e.g. "//edupulse/lessons"). Required with the
	// cloudevents formats, unused otherwise.
	CloudEventsSource string `yaml:"cloudevents_source"`
	// AppID is every message's app-id property, and ConnectionName the
	// connection's name in the broker's management UI. Default (empty):
	// "outbox-relay/<host name>/<schema>.<table>", which tells sidecars and
	// tables apart (in Kubernetes the host name is the pod's name).
	AppID          string `yaml:"app_id"`
	ConnectionName string `yaml:"connection_name"`
}

// DefaultMaxUnconfirmed is amqp.max_unconfirmed's default.
const DefaultMaxUnconfirmed = 100

// EngineConfig tunes the claim loop.
type EngineConfig struct {
	// BatchSize is the most rows claimed and published per transaction. Default 500.
	BatchSize int `yaml:"batch_size"`
	// BatchBytes bounds the payload bytes the relay holds at once: a claim
	// stops when the payloads of its rows and of the batches still in
	// flight would pass it. A single row larger than it is claimed alone,
	// once nothing else is in flight. The live heap stays near the larger
	// of BatchBytes and amqp.max_message_size plus about 15 MiB (see
	// docs/failure-model.md, "Memory"). Default 16777216 (16 MiB).
	BatchBytes int64 `yaml:"batch_bytes"`
	// OnDispatch is "mark" (default: set dispatched_at and move the row to
	// the archive <table>_dispatched, in one statement) or "delete" (remove
	// the row once the broker confirmed it).
	OnDispatch string `yaml:"on_dispatch"`
	// MaxAttempts is how many failed publishes park an event as dead. Default 10.
	MaxAttempts int `yaml:"max_attempts"`
	// RetryMinBackoff is the delay before the first retry; each further attempt
	// doubles it (with jitter) up to RetryMaxBackoff. Defaults 1s and 5m.
	RetryMinBackoff time.Duration `yaml:"retry_min_backoff"`
	RetryMaxBackoff time.Duration `yaml:"retry_max_backoff"`
	// ShutdownTimeout bounds the drain at shutdown: confirms of the batch in
	// flight are awaited this long, then what was confirmed is committed. Default 30s.
	ShutdownTimeout time.Duration `yaml:"shutdown_timeout"`
	// StatsInterval is how often backlog and dead counts are read from the
	// table for metrics. Default 5s; stretched to 100 times the last read's
	// duration when the counts get slow (large backlogs), so they never take
	// more than 1% of the database's time.
	StatsInterval time.Duration `yaml:"stats_interval"`
	// Ordering is "none" (default: rows are published in claim order, in
	// parallel across replicas) or "partition_key": rows with the same
	// partition_key reach the broker in sequence order, one in flight per key;
	// rows without a key stay unordered.
	Ordering string `yaml:"ordering"`
	// Partitions is the number of virtual partitions keys are hashed into;
	// replicas lease partitions through a table of leases and split them
	// evenly. Ordered mode only. Default 64. Changing it while relays run is
	// safe (order is kept by row locks), but all replicas should agree.
	Partitions int `yaml:"partitions"`
	// LeaseTimeout, in ordered mode, is how long a replica keeps its
	// partitions without renewing them: its claim loop renews them every
	// sixth of it, so a replica that freezes or whose loop stops making
	// progress loses them, and its keys move to another replica, within
	// about 1.2 times this; its /healthz then fails. It also bounds how long
	// a claimed batch may wait for its confirms. Default 15s; at least 1s.
	LeaseTimeout time.Duration `yaml:"lease_timeout"`
	// OnDead, in ordered mode, is "continue" (default: a dead row no longer
	// blocks its key) or "block" (the key waits until an operator retries or
	// purges the dead row).
	OnDead string `yaml:"on_dead"`
}

// WakeConfig chooses how the relay learns that rows are waiting.
type WakeConfig struct {
	// Mode is "poll" (default) or "notify". poll probes the pending index,
	// every MinInterval while events flow, backing off to PollInterval when
	// idle; it costs producers nothing. notify LISTENs for the table's trigger
	// (enable it with `outbox-relay notify enable`), polling every
	// PollInterval as a fallback; each notifying commit takes a database-wide
	// lock, which slows producers that commit concurrently.
	Mode string `yaml:"mode"`
	// PollInterval is the longest wait between probes. Default 100ms in poll
	// mode, 10s in notify mode.
	PollInterval time.Duration `yaml:"poll_interval"`
	// MinInterval is the wait between probes while events flow (poll mode).
	// After an empty probe the wait doubles, except while rows were still
	// claimed faster than one per MinInterval: a pause in such a flow keeps
	// this cadence for as long as the claim rate estimate stays above that
	// (about 70 ms after a flow of 1,000/s), so that the rows committed after
	// a short stall do not wait for a backed-off probe. Default 2ms.
	MinInterval time.Duration `yaml:"min_interval"`
	// Linger replaces MinInterval as the wait after a short batch while rows
	// are claimed faster than LingerAbove (poll mode, unordered): under a
	// heavy flow the next batch gathers more rows, and the relay's cost per
	// event, which producers pay for in CPU, falls. Default 20ms (within
	// [MinInterval, PollInterval]); set it to MinInterval to never linger.
	Linger time.Duration `yaml:"linger"`
	// LingerAbove is the claim rate, in events/s, above which the relay
	// lingers. Default 2000.
	LingerAbove int `yaml:"linger_above"`
}

// Accepted values of the enumerated settings.
const (
	WakePoll   = "poll"
	WakeNotify = "notify"

	PoolerNone        = "none"
	PoolerTransaction = "transaction"

	OrderingNone         = "none"
	OrderingPartitionKey = "partition_key"

	OnDeadContinue = "continue"
	OnDeadBlock    = "block"

	OnDispatchMark   = "mark"
	OnDispatchDelete = "delete"

	UnroutableFail   = "fail"
	UnroutableAccept = "accept"

	FormatPlain                 = "plain"
	FormatCloudEventsBinary     = "cloudevents-binary"
	FormatCloudEventsStructured = "cloudevents-structured"
)

// WithDefaults returns c with every zero value replaced by its default.
func (c Config) WithDefaults() Config {
	c.Postgres.Schema = cmp.Or(c.Postgres.Schema, "public")
	c.Postgres.Table = cmp.Or(c.Postgres.Table, "outbox")
	c.Postgres.MaxConns = cmp.Or(c.Postgres.MaxConns, 4)
	c.Postgres.Pooler = cmp.Or(c.Postgres.Pooler, PoolerNone)
	c.Postgres.QueryExecMode = cmp.Or(c.Postgres.QueryExecMode, dsnQueryExecMode(c.Postgres.DSN), defaultQueryExecMode)
	c.AMQP.ExchangeType = cmp.Or(c.AMQP.ExchangeType, "topic")
	if c.AMQP.DeclareExchange == nil {
		t := true
		c.AMQP.DeclareExchange = &t
	}
	c.AMQP.ConfirmTimeout = cmp.Or(c.AMQP.ConfirmTimeout, 30*time.Second)
	c.AMQP.MaxUnconfirmed = cmp.Or(c.AMQP.MaxUnconfirmed, DefaultMaxUnconfirmed)
	c.AMQP.MaxMessageSize = cmp.Or(c.AMQP.MaxMessageSize, 128<<20)
	c.AMQP.Unroutable = cmp.Or(c.AMQP.Unroutable, UnroutableFail)
	if len(c.AMQP.Exchanges) == 0 {
		c.AMQP.Exchanges = nil // an empty list and none are the same
	}
	c.AMQP.Format = cmp.Or(c.AMQP.Format, FormatPlain)
	c.Relay.BatchSize = cmp.Or(c.Relay.BatchSize, 500)
	c.Relay.BatchBytes = cmp.Or(c.Relay.BatchBytes, 16<<20)
	c.Relay.OnDispatch = cmp.Or(c.Relay.OnDispatch, OnDispatchMark)
	c.Relay.MaxAttempts = cmp.Or(c.Relay.MaxAttempts, 10)
	c.Relay.RetryMinBackoff = cmp.Or(c.Relay.RetryMinBackoff, time.Second)
	c.Relay.RetryMaxBackoff = cmp.Or(c.Relay.RetryMaxBackoff, 5*time.Minute)
	c.Relay.ShutdownTimeout = cmp.Or(c.Relay.ShutdownTimeout, 30*time.Second)
	c.Relay.StatsInterval = cmp.Or(c.Relay.StatsInterval, 5*time.Second)
	c.Relay.Ordering = cmp.Or(c.Relay.Ordering, OrderingNone)
	c.Relay.Partitions = cmp.Or(c.Relay.Partitions, 64)
	c.Relay.LeaseTimeout = cmp.Or(c.Relay.LeaseTimeout, 15*time.Second)
	c.Relay.OnDead = cmp.Or(c.Relay.OnDead, OnDeadContinue)
	if c.Retention.Enabled == nil {
		t := true
		c.Retention.Enabled = &t
	}
	c.Retention.Dispatched = cmp.Or(c.Retention.Dispatched, 7*24*time.Hour)
	c.Retention.Interval = cmp.Or(c.Retention.Interval, time.Minute)
	c.Retention.BatchSize = cmp.Or(c.Retention.BatchSize, 1000)
	c.Wake.Mode = cmp.Or(c.Wake.Mode, WakePoll)
	if c.Wake.Mode == WakeNotify {
		c.Wake.PollInterval = cmp.Or(c.Wake.PollInterval, 10*time.Second)
	} else {
		c.Wake.PollInterval = cmp.Or(c.Wake.PollInterval, 100*time.Millisecond)
	}
	c.Wake.MinInterval = cmp.Or(c.Wake.MinInterval, 2*time.Millisecond)
	// Kept within [min_interval, poll_interval] when those are set.
	c.Wake.Linger = cmp.Or(c.Wake.Linger, min(max(20*time.Millisecond, c.Wake.MinInterval), c.Wake.PollInterval))
	c.Wake.LingerAbove = cmp.Or(c.Wake.LingerAbove, 2000)
	return c
}

// WithAppNames fills amqp.app_id and amqp.connection_name when empty. It is
// apart from WithDefaults because the default depends on the host.
func (c Config) WithAppNames() Config {
	host, err := os.Hostname()
	if err != nil || host == "" {
		host = "unknown-host"
	}
	name := "outbox-relay/" + host + "/" + c.Postgres.Schema + "." + c.Postgres.Table
	c.AMQP.AppID = cmp.Or(c.AMQP.AppID, name)
	c.AMQP.ConnectionName = cmp.Or(c.AMQP.ConnectionName, name)
	return c
}

// table returns the configured outbox table.
func (c Config) table() ident.Table {
	return ident.Table{Schema: c.Postgres.Schema, Name: c.Postgres.Table}
}

// inflightLimit is how many sent batches may await their confirms at once.
// Each holds a pool connection; two are kept for claiming and the stats and
// cleaner loops.
func (c Config) inflightLimit() int {
	return max(1, min(4, int(c.WithDefaults().Postgres.MaxConns)-2))
}

// PendingBatches is the most batches a relay with this configuration has
// sent to its Publisher and not yet waited for: those awaiting their
// confirms, plus the one the claim loop holds while they are that many. A
// Publisher that keeps per-batch state (rabbitmq.Options.Batches) sizes it
// by this.
func (c Config) PendingBatches() int { return c.inflightLimit() + 1 }
