package relay_test

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap/zaptest"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/metrics"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
)

// TestThroughPgBouncer checks that writers and a relay in poll mode with the
// default query exec mode, both going through PgBouncer in transaction mode
// (PgBouncer's defaults otherwise), deliver every event and mark every row,
// without a database error on the way (named prepared statements would fail
// now and then, and only retries would hide it): with postgres.pooler left
// at none, and set to transaction as docs/operations.md's recipe does.
func TestThroughPgBouncer(t *testing.T) {
	t.Parallel()
	pgb := testenv.StartPgBouncer(t, testenv.DatabaseURL())
	for _, pooler := range []string{"", relay.PoolerTransaction} {
		t.Run("pooler="+cmp.Or(pooler, "unset"), func(t *testing.T) {
			t.Parallel()
			throughPgBouncer(t, pgb, pooler)
		})
	}
}

// throughPgBouncer writes and relays events through pgb, the relay's
// postgres.pooler set to pooler, and checks each arrives.
func throughPgBouncer(t *testing.T, pgb *testenv.PgBouncer, pooler string) {
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	deliveries := b.Consume(t, b.Queue(t, "#", nil))
	dsn := pgb.DSN("test")

	cfg := config(o, b)
	cfg.Postgres.DSN, cfg.Postgres.Pooler = dsn, pooler
	_, logs := startObserved(t, cfg)

	// The application's own pool goes through the pooler too; pgx's default
	// named prepared statements do not survive transaction pooling before
	// PgBouncer 1.21, so it uses the same mode as the relay.
	ctx := context.Background()
	appPool, err := pgxpool.New(ctx, dsn+"&default_query_exec_mode=cache_describe")
	if err != nil {
		t.Fatal(err)
	}
	defer appPool.Close()
	w, err := outbox.NewWriter(o.Schema, o.Table.Name)
	if err != nil {
		t.Fatal(err)
	}
	const writers, txns, perTx = 4, 50, 10
	want := make(map[string]outbox.Event, writers*txns*perTx)
	var mu sync.Mutex
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for g := range writers {
		wg.Go(func() {
			for n := range txns {
				events := make([]outbox.Event, perTx)
				for i := range events {
					events[i] = outbox.NewEvent("lesson.published", fmt.Appendf(nil, `{"writer":%d,"tx":%d,"i":%d}`, g, n, i))
				}
				if err := pgx.BeginFunc(ctx, appPool, func(tx pgx.Tx) error { return w.Write(ctx, tx, events...) }); err != nil {
					errs <- fmt.Errorf("writer %d, transaction %d: %w", g, n, err)
					return
				}
				mu.Lock()
				for _, ev := range events {
					want[ev.ID.String()] = ev
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if dups := receiveAll(t, deliveries, want, time.Minute); dups != 0 {
		t.Logf("%d duplicates (allowed)", dups)
	}
	testenv.Eventually(t, 10*time.Second, "every row dispatched", func() bool {
		return o.Count(t, "dispatched_at IS NOT NULL") == len(want)
	})
	for _, e := range logs.FilterMessage("link down").All() {
		t.Errorf("link down through PgBouncer: %v", e.ContextMap())
	}
	for _, e := range logs.FilterMessage("read stats").All() {
		t.Errorf("stats query failed through PgBouncer: %v", e.ContextMap())
	}
}

// TestUndeclaredPgBouncerRefusesSessionModes checks that notify mode and
// ordered mode, pointed at PgBouncer in transaction mode without
// postgres.pooler saying so, stop at start with an error naming the pooler
// and the fix, instead of running with notifications astray or leases left
// on pooled sessions.
func TestUndeclaredPgBouncerRefusesSessionModes(t *testing.T) {
	t.Parallel()
	pgb := testenv.StartPgBouncer(t, testenv.DatabaseURL())
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	for _, tc := range []struct {
		setting string
		set     func(*relay.Config)
	}{
		{"wake.mode: notify", func(c *relay.Config) { c.Wake.Mode = relay.WakeNotify }},
		{"relay.ordering: partition_key", func(c *relay.Config) { c.Relay.Ordering = relay.OrderingPartitionKey }},
	} {
		cfg := config(o, b)
		cfg.Postgres.DSN = pgb.DSN("test")
		tc.set(&cfg)
		m, err := metrics.New(prometheus.NewRegistry(), metrics.Config{})
		if err != nil {
			t.Fatal(err)
		}
		r, err := relay.New(cfg, relay.Deps{Logger: zaptest.NewLogger(t), Metrics: m})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		err = r.Run(ctx)
		cancel()
		if !errors.Is(err, relay.ErrTransactionPooler) {
			t.Fatalf("%s through PgBouncer: Run returned %v, want ErrTransactionPooler", tc.setting, err)
		}
		for _, want := range []string{tc.setting, "PgBouncer", "session-mode pool"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("%s: error %q does not mention %q", tc.setting, err, want)
			}
		}
	}
}

// TestPoolerTransactionRefusesSessionFeatures checks that with
// postgres.pooler: transaction the settings that need a session (LISTEN,
// session advisory-lock leases) are refused at start, naming the key, the
// pooler and the fix, instead of running and misbehaving.
func TestPoolerTransactionRefusesSessionFeatures(t *testing.T) {
	t.Parallel()
	base := relay.Config{
		Postgres: relay.PostgresConfig{DSN: "postgres://postgres@127.0.0.1:6432/test", Pooler: relay.PoolerTransaction},
		AMQP:     relay.AMQPConfig{URL: "amqp://guest:guest@127.0.0.1:5672/", Exchange: "events"},
	}
	if err := base.WithDefaults().Validate(); err != nil {
		t.Fatalf("poll mode, unordered, behind a transaction pooler: %v", err)
	}
	for _, tc := range []struct {
		key string
		set func(*relay.Config)
	}{
		{"wake.mode", func(c *relay.Config) { c.Wake.Mode = relay.WakeNotify }},
		{"relay.ordering", func(c *relay.Config) { c.Relay.Ordering = relay.OrderingPartitionKey }},
	} {
		cfg := base
		tc.set(&cfg)
		err := cfg.WithDefaults().Validate()
		var fe *relay.FieldError
		if !errors.As(err, &fe) || fe.Key != tc.key {
			t.Fatalf("%s behind a transaction pooler: got %v, want an error naming %s", tc.key, err, tc.key)
		}
		for _, want := range []string{"PgBouncer", "postgres.pooler: none", "session"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("%s: error %q does not mention %q", tc.key, err, want)
			}
		}
	}
}
