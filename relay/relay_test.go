package relay_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"database/sql"
	"fmt"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"
	amqp "github.com/rabbitmq/amqp091-go"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/metrics"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
)

// config returns a relay config for the test's outbox and broker.
func config(o *testenv.Outbox, b *testenv.Broker) relay.Config { return testenv.RelayConfig(o, b) }

// running is a relay running in-process for one test.
type running = testenv.Relay

// start runs a relay until the test ends (or Stop), failing the test if Run
// returns an error. Each relay has a metrics registry of its own.
func start(t *testing.T, cfg relay.Config) *running {
	t.Helper()
	return startLogged(t, cfg, zaptest.NewLogger(t))
}

// startLogged is start with the given logger.
func startLogged(t *testing.T, cfg relay.Config, log *zap.Logger) *running {
	t.Helper()
	return testenv.StartRelay(t, cfg, testenv.WithLogger(log))
}

// written is what a test wrote, to compare with what arrived.
type written struct {
	ev  outbox.Event
	sql bool // plain SQL insert: defaults apply
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}

// TestEndToEnd writes 10,000 events through the Go helper (pgx and
// database/sql, 100 transactions) and 100 by plain SQL, and checks that each
// arrives with its exact bytes and properties; a rolled-back transaction
// publishes nothing.
func TestEndToEnd(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	deliveries := b.Consume(t, b.Queue(t, "#", nil))
	w, err := outbox.NewWriter(o.Schema, o.Table.Name)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()

	// A rolled-back transaction, before anything else.
	rolledBack := outbox.NewEvent("lesson.published", []byte(`{"rolled":"back"}`))
	tx, err := o.Pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Write(ctx, tx, rolledBack); err != nil {
		t.Fatal(err)
	}
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}

	start(t, config(o, b))

	want := map[string]written{}
	db := o.DB(t)
	for txn := 0; txn < 100; txn++ {
		events := make([]outbox.Event, 100)
		for i := range events {
			ev := outbox.NewEvent([]string{"lesson.published", "quiz.submitted", "badge.awarded"}[i%3], nil)
			switch i % 4 {
			case 0: // arbitrary bytes, including invalid UTF-8 and NULs
				ev.Payload = randomBytes(1 + i)
				ev.ContentType = "application/octet-stream"
			case 1:
				ev.Payload = []byte{} // empty but not nil
			default:
				ev.Payload = fmt.Appendf(nil, `{"txn":%d,"i":%d,"note":"✓ ünïcode"}`, txn, i)
			}
			ev.Key = fmt.Sprintf("learner-%d", i%7)
			ev.CorrelationID = fmt.Sprintf("req-%d-%d", txn, i)
			ev.Headers = map[string]string{"schema-version": "2", "origin": fmt.Sprint("txn-", txn)}
			events[i] = ev
			want[ev.ID.String()] = written{ev: ev}
		}
		if txn%2 == 0 {
			err = pgx.BeginFunc(ctx, o.Pool, func(tx pgx.Tx) error { return w.Write(ctx, tx, events...) })
		} else {
			err = writeSQL(ctx, db, w, events)
		}
		if err != nil {
			t.Fatalf("transaction %d: %v", txn, err)
		}
	}
	for i := 0; i < 100; i++ {
		var id uuid.UUID
		payload := fmt.Sprintf(`{"plain":%d}`, i)
		err := o.Pool.QueryRow(ctx, fmt.Sprintf(`INSERT INTO %s (event_type, payload) VALUES ('lesson.published', $1) RETURNING id`, o.Table.Quoted()),
			[]byte(payload)).Scan(&id)
		if err != nil {
			t.Fatal(err)
		}
		want[id.String()] = written{ev: outbox.Event{ID: id, Type: "lesson.published", Payload: []byte(payload)}, sql: true}
	}

	got := testenv.Receive(t, deliveries, len(want), 2*time.Minute)
	seen := map[string]bool{}
	for _, d := range got {
		if d.MessageId == rolledBack.ID.String() {
			t.Fatalf("the rolled-back event was published")
		}
		w, ok := want[d.MessageId]
		if !ok {
			t.Fatalf("unexpected message id %q", d.MessageId)
		}
		if seen[d.MessageId] {
			t.Fatalf("message %s delivered twice", d.MessageId)
		}
		seen[d.MessageId] = true
		checkDelivery(t, d, w)
	}
	if _, quiet := testenv.Quiet(deliveries, 300*time.Millisecond); !quiet {
		t.Fatal("more messages arrived than were written")
	}
	testenv.Eventually(t, 10*time.Second, "every row dispatched", func() bool {
		return o.Count(t, "dispatched_at IS NOT NULL") == len(want)
	})
	if n := o.Count(t, "true"); n != len(want) {
		t.Fatalf("table has %d rows, want %d (the rolled-back row must not exist)", n, len(want))
	}
}

func writeSQL(ctx context.Context, db *sql.DB, w *outbox.Writer, events []outbox.Event) error {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	if err := w.WriteSQL(ctx, tx, events...); err != nil {
		_ = tx.Rollback()
		return err
	}
	return tx.Commit()
}

func checkDelivery(t *testing.T, d amqp.Delivery, w written) {
	t.Helper()
	ev := w.ev
	if !bytes.Equal(d.Body, ev.Payload) {
		t.Fatalf("%s: body %q, want %q", ev.ID, d.Body, ev.Payload)
	}
	wantCT := ev.ContentType
	if wantCT == "" {
		wantCT = outbox.ContentTypeJSON
	}
	if d.Type != ev.Type || d.RoutingKey != ev.Type || d.ContentType != wantCT || d.CorrelationId != ev.CorrelationID {
		t.Fatalf("%s: type %q routing key %q content type %q correlation id %q; want %q %q %q %q",
			ev.ID, d.Type, d.RoutingKey, d.ContentType, d.CorrelationId, ev.Type, ev.Type, wantCT, ev.CorrelationID)
	}
	if d.DeliveryMode != amqp.Persistent {
		t.Fatalf("%s: delivery mode %d, want persistent", ev.ID, d.DeliveryMode)
	}
	if d.Timestamp.IsZero() || time.Since(d.Timestamp) > 10*time.Minute {
		t.Fatalf("%s: timestamp %v is not the row's created_at", ev.ID, d.Timestamp)
	}
	for k, v := range ev.Headers {
		if d.Headers[k] != v {
			t.Fatalf("%s: header %q = %v, want %q", ev.ID, k, d.Headers[k], v)
		}
	}
	if _, ok := d.Headers[relay.HeaderSeq].(int64); !ok {
		t.Fatalf("%s: header %s = %#v, want an int64 sequence", ev.ID, relay.HeaderSeq, d.Headers[relay.HeaderSeq])
	}
	if ev.Key != "" && d.Headers[relay.HeaderPartitionKey] != ev.Key {
		t.Fatalf("%s: partition key header %v, want %q", ev.ID, d.Headers[relay.HeaderPartitionKey], ev.Key)
	}
	if want := len(ev.Headers) + 1 + btoi(ev.Key != ""); len(d.Headers) != want {
		t.Fatalf("%s: %d headers %v, want %d", ev.ID, len(d.Headers), d.Headers, want)
	}
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// TestTwoRelays runs two relays on one table: both take part in the work,
// every event is published once and every row is dispatched once.
func TestTwoRelays(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	deliveries := b.Consume(t, b.Queue(t, "#", nil))
	cfg := config(o, b)
	cfg.Relay.BatchSize = 50
	cfg.Wake.PollInterval = 10 * time.Millisecond
	r1, r2 := start(t, cfg), start(t, cfg)
	// Both relays are up and have found the table empty at least once
	// before anything is written; then the whole backlog commits at once.
	// Each relay looks again within its 10 ms poll interval, while one
	// relay alone needs 100 batches of 50 (each a claim, a broker confirm
	// round trip and a commit, at most two in flight) to drain it: far more
	// than 10 ms, so both relays claim batches, and a relay that stays at 0
	// is one that could not claim beside the other.
	idle := func(r *running) bool {
		return r.Ready() == nil && value(t, r.Metrics.Wakeups.WithLabelValues(metrics.WakePoll)) > 0
	}
	testenv.Eventually(t, 20*time.Second, "both relays ready and idle", func() bool { return idle(r1) && idle(r2) })

	w, _ := outbox.NewWriter(o.Schema, o.Table.Name)
	ctx := context.Background()
	const total = 5000
	ids := map[string]int{}
	events := make([]outbox.Event, total)
	for i := range events {
		events[i] = outbox.NewEvent("quiz.submitted", fmt.Appendf(nil, `{"n":%d}`, i))
		ids[events[i].ID.String()] = 0
	}
	if err := pgx.BeginFunc(ctx, o.Pool, func(tx pgx.Tx) error { return w.Write(ctx, tx, events...) }); err != nil {
		t.Fatal(err)
	}
	for _, d := range testenv.Receive(t, deliveries, total, time.Minute) {
		if _, ok := ids[d.MessageId]; !ok {
			t.Fatalf("unexpected message %s", d.MessageId)
		}
		ids[d.MessageId]++
	}
	for id, n := range ids {
		if n != 1 {
			t.Fatalf("event %s delivered %d times", id, n)
		}
	}
	if _, quiet := testenv.Quiet(deliveries, 300*time.Millisecond); !quiet {
		t.Fatal("a duplicate arrived")
	}
	// Dispatched at the first attempt: no row was failed, retried or
	// published twice.
	testenv.Eventually(t, 10*time.Second, "all rows dispatched", func() bool {
		return o.Count(t, "dispatched_at IS NOT NULL AND attempts = 0") == total
	})
	if n := o.Count(t, "true"); n != total {
		t.Fatalf("table has %d rows, want %d", n, total)
	}
	// Counters are incremented before the batch commits, so they are final
	// once every row is dispatched.
	p1 := counterSum(t, r1.Metrics.Published)
	p2 := counterSum(t, r2.Metrics.Published)
	t.Logf("relay 1 published %d, relay 2 published %d", p1, p2)
	if p1 == 0 || p2 == 0 {
		t.Fatalf("relays published %d and %d: one relay did all the work", p1, p2)
	}
	if p1+p2 != total {
		t.Fatalf("relays published %d + %d, want %d in all", p1, p2, total)
	}
}

func counterSum(t *testing.T, c prometheus.Collector) int {
	t.Helper()
	ch := make(chan prometheus.Metric, 100)
	go func() { c.Collect(ch); close(ch) }()
	sum := 0.0
	for m := range ch {
		var pb dtoMetric
		if err := m.Write(&pb.Metric); err != nil {
			t.Fatal(err)
		}
		sum += pb.GetCounter().GetValue()
	}
	return int(sum)
}

// value reads one counter or gauge.
func value(t *testing.T, m prometheus.Metric) float64 {
	t.Helper()
	return testenv.Value(t, m)
}

// TestStatsWait: the stats query runs every relay.stats_interval while it
// is cheap, and at most 1% of the time once the counts get slow, but never
// so late that the lease it holds lapses first (2.5 s to spare).
func TestStatsWait(t *testing.T) {
	for _, c := range []struct{ interval, took, lease, want time.Duration }{
		{5 * time.Second, 2 * time.Millisecond, 20 * time.Second, 5 * time.Second},
		{5 * time.Second, 50 * time.Millisecond, 20 * time.Second, 5 * time.Second},
		{5 * time.Second, 240 * time.Millisecond, 80 * time.Second, 24 * time.Second},
		{time.Second, 0, 8 * time.Second, time.Second},
		// A round slower than the last: the stretch stops within the lease.
		{200 * time.Millisecond, 60 * time.Millisecond, 5600 * time.Millisecond, 3040 * time.Millisecond},
		{5 * time.Second, 240 * time.Millisecond, 20 * time.Second, 17260 * time.Millisecond},
		// A round slower than the lease: relay.stats_interval is the floor.
		{time.Second, 9 * time.Second, 8 * time.Second, time.Second},
	} {
		if got := relay.StatsWait(c.interval, c.took, c.lease); got != c.want {
			t.Errorf("statsWait(%v, %v, %v) = %v, want %v", c.interval, c.took, c.lease, got, c.want)
		}
	}
}
