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
	"go.uber.org/zap/zaptest/observer"

	"github.com/outbox-relay/outbox-relay/internal/ops"
	"github.com/outbox-relay/outbox-relay/internal/testenv"
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

	commit := appWriter(t, dsn, o)
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
				if err := commit(events...); err != nil {
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
	if dups := testenv.ReceiveAll(t, deliveries, want, time.Minute); dups != 0 {
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

// TestUndeclaredPgBouncerRefusesSessionModes checks that notify mode,
// pointed at PgBouncer in transaction mode without postgres.pooler saying
// so, stops at start with an error naming the pooler and the fix, instead
// of running with notifications astray.
func TestUndeclaredPgBouncerRefusesSessionModes(t *testing.T) {
	t.Parallel()
	pgb := testenv.StartPgBouncer(t, testenv.DatabaseURL())
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	for _, tc := range []struct {
		setting string
		set     func(*relay.Config)
	}{
		{"wake.mode: notify", func(c *relay.Config) { c.Wake.Mode = relay.WakeNotify }},
	} {
		cfg := config(o, b)
		cfg.Postgres.DSN = pgb.DSN("test")
		tc.set(&cfg)
		r := testenv.NewRelay(t, cfg)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		err := r.Run(ctx)
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
// postgres.pooler: transaction the setting that needs a session (LISTEN) is
// refused at start, naming the key, the pooler and the fix, instead of
// running and misbehaving; ordered mode is accepted.
func TestPoolerTransactionRefusesSessionFeatures(t *testing.T) {
	t.Parallel()
	base := relay.Config{
		Postgres: relay.PostgresConfig{DSN: "postgres://postgres@127.0.0.1:6432/test", Pooler: relay.PoolerTransaction},
		AMQP:     relay.AMQPConfig{URL: "amqp://guest:guest@127.0.0.1:5672/", Exchange: "events"},
	}
	if err := base.WithDefaults().Validate(); err != nil {
		t.Fatalf("poll mode, unordered, behind a transaction pooler: %v", err)
	}
	ordered := base
	ordered.Relay.Ordering = relay.OrderingPartitionKey
	if err := ordered.WithDefaults().Validate(); err != nil {
		t.Fatalf("ordered mode behind a transaction pooler: %v", err)
	}
	for _, tc := range []struct {
		key string
		set func(*relay.Config)
	}{
		{"wake.mode", func(c *relay.Config) { c.Wake.Mode = relay.WakeNotify }},
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

// TestOrderedThroughPgBouncer: two ordered relays and the writers all go
// through PgBouncer in transaction mode (declared by postgres.pooler); the
// relays split the partitions through the lease table and every event
// arrives, each key's in sequence order, with no database error.
func TestOrderedThroughPgBouncer(t *testing.T) {
	t.Parallel()
	pgb := testenv.StartPgBouncer(t, testenv.DatabaseURL())
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	deliveries := b.Consume(t, b.Queue(t, "#", nil))
	dsn := pgb.DSN("test")
	cfg := orderedConfig(o, b)
	cfg.Postgres.DSN = dsn
	cfg.Postgres.Pooler = relay.PoolerTransaction
	_, logs1 := startObserved(t, cfg)
	_, logs2 := startObserved(t, cfg)
	ctx := context.Background()
	testenv.Eventually(t, 20*time.Second, "two relays holding 4 partitions each", func() bool {
		list, err := ops.PartitionOwners(ctx, o.Pool, o.Schema, o.Table.Name)
		if err != nil {
			t.Fatal(err)
		}
		return len(list) == 2 && len(list[0].Partitions) == 4 && len(list[1].Partitions) == 4
	})

	commit := appWriter(t, dsn, o)
	const total = 600
	for n := 0; n < total; n += 3 {
		events := make([]outbox.Event, 3)
		for i := range events {
			events[i] = outbox.NewEvent("lesson.progressed", fmt.Appendf(nil, `{"n":%d}`, n+i))
			events[i].Key = fmt.Sprint("lesson-", (n+i)%20)
		}
		if err := commit(events...); err != nil {
			t.Fatal(err)
		}
	}
	seen := map[string]bool{}
	last := map[string]int64{}
	deadline := time.After(time.Minute)
	for len(seen) < total {
		select {
		case d := <-deliveries:
			if seen[d.MessageId] {
				continue
			}
			seen[d.MessageId] = true
			key := d.Headers[relay.HeaderPartitionKey].(string)
			if s := seqOf(t, d); s <= last[key] {
				t.Fatalf("key %s: seq %d after %d", key, s, last[key])
			} else {
				last[key] = s
			}
		case <-deadline:
			t.Fatalf("received %d of %d events within a minute", len(seen), total)
		}
	}
	for _, logs := range []*observer.ObservedLogs{logs1, logs2} {
		for _, e := range logs.FilterMessage("link down").All() {
			t.Errorf("link down through PgBouncer: %v", e.ContextMap())
		}
	}
}

// appWriter returns a function that commits events in one transaction of
// the application's own pool, which goes through the pooler at dsn too:
// pgx's default named prepared statements do not survive transaction
// pooling before PgBouncer 1.21, so it uses the same mode as the relay.
func appWriter(t *testing.T, dsn string, o *testenv.Outbox) func(events ...outbox.Event) error {
	t.Helper()
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, dsn+"&default_query_exec_mode=cache_describe")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	w, err := outbox.NewWriter(o.Schema, o.Table.Name)
	if err != nil {
		t.Fatal(err)
	}
	return func(events ...outbox.Event) error {
		return pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error { return w.Write(ctx, tx, events...) })
	}
}
