package relay_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
)

// TestDelayedEvent: an event with AvailableAt in the future is published no
// earlier than that time, while an undelayed one written after it goes first.
func TestDelayedEvent(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	deliveries := b.Consume(t, b.Queue(t, "#", nil))
	start(t, config(o, b))
	w, _ := outbox.NewWriter(o.Schema, o.Table.Name)
	ctx := context.Background()
	delayed := outbox.NewEvent("reminder.due", []byte(`{}`))
	delayed.AvailableAt = time.Now().Add(1500 * time.Millisecond)
	now := outbox.NewEvent("lesson.published", []byte(`{}`))
	if err := pgx.BeginFunc(ctx, o.Pool, func(tx pgx.Tx) error { return w.Write(ctx, tx, delayed, now) }); err != nil {
		t.Fatal(err)
	}
	got := testenv.Receive(t, deliveries, 2, 10*time.Second)
	if got[0].MessageId != now.ID.String() || got[1].MessageId != delayed.ID.String() {
		t.Fatalf("order %s, %s: the delayed event went first", got[0].Type, got[1].Type)
	}
	if arrived := time.Now(); arrived.Before(delayed.AvailableAt) {
		t.Fatalf("delayed event arrived %s before its AvailableAt", delayed.AvailableAt.Sub(arrived))
	}
}

// TestTraceparentForwarded: a traceparent carried by the writer's context is
// stored in the event's headers and arrives as an AMQP header.
func TestTraceparentForwarded(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	deliveries := b.Consume(t, b.Queue(t, "#", nil))
	start(t, config(o, b))
	w, _ := outbox.NewWriter(o.Schema, o.Table.Name)
	const tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
	ctx := outbox.ContextWithTraceparent(context.Background(), tp)
	traced := outbox.NewEvent("lesson.published", []byte(`{}`))
	explicit := outbox.NewEvent("lesson.published", []byte(`{}`))
	explicit.Headers = map[string]string{"traceparent": "00-11111111111111111111111111111111-2222222222222222-00"}
	if err := pgx.BeginFunc(ctx, o.Pool, func(tx pgx.Tx) error { return w.Write(ctx, tx, traced, explicit) }); err != nil {
		t.Fatal(err)
	}
	for _, d := range testenv.Receive(t, deliveries, 2, 10*time.Second) {
		want := tp
		if d.MessageId == explicit.ID.String() {
			want = explicit.Headers["traceparent"]
		}
		if d.Headers["traceparent"] != want {
			t.Fatalf("%s: traceparent %v, want %s", d.MessageId, d.Headers["traceparent"], want)
		}
	}
	if explicit.Headers["traceparent"] == tp || traced.Headers != nil {
		t.Fatal("Write modified the caller's events")
	}
}

// TestRetentionCleaner: dispatched and dead rows past their retention are
// deleted in small batches, in the archive and the dispatched rows an older
// relay left in the outbox table alike; recent ones and pending rows stay.
func TestRetentionCleaner(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	ctx := context.Background()
	tbl := o.Table.Quoted()
	// 250 old dispatched, 20 recent dispatched (both archived), 15 old
	// dispatched marked in place, 30 old dead, 5 recent dead, 7 pending
	// in the future.
	for _, q := range []string{
		`INSERT INTO ` + tbl + ` (event_type, payload, dispatched_at) SELECT 'old', '\x00', now() - interval '8 days' FROM generate_series(1, 250)`,
		`INSERT INTO ` + tbl + ` (event_type, payload, dispatched_at) SELECT 'recent', '\x00', now() - interval '1 minute' FROM generate_series(1, 20)`,
		`INSERT INTO ` + tbl + ` (event_type, payload, dispatched_at) SELECT 'old-in-place', '\x00', now() - interval '8 days' FROM generate_series(1, 15)`,
		`INSERT INTO ` + tbl + ` (event_type, payload, dead_at, attempts) SELECT 'dead-old', '\x00', now() - interval '2 days', 10 FROM generate_series(1, 30)`,
		`INSERT INTO ` + tbl + ` (event_type, payload, dead_at, attempts) SELECT 'dead-recent', '\x00', now(), 10 FROM generate_series(1, 5)`,
		`INSERT INTO ` + tbl + ` (event_type, payload, available_at) SELECT 'later', '\x00', now() + interval '1 day' FROM generate_series(1, 7)`,
	} {
		if _, err := o.Pool.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	if n := o.ArchiveRows(t, "event_type IN ('old', 'recent')"); n != 270 {
		t.Fatalf("archived %d rows, want 270", n)
	}
	cfg := config(o, b)
	cfg.Retention.Dispatched = 24 * time.Hour
	cfg.Retention.Dead = 24 * time.Hour
	cfg.Retention.Interval = 50 * time.Millisecond
	cfg.Retention.BatchSize = 40
	r := start(t, cfg)
	testenv.Eventually(t, 20*time.Second, "old rows deleted", func() bool {
		return o.Count(t, "event_type IN ('old', 'old-in-place', 'dead-old')") == 0
	})
	for typ, want := range map[string]int{"recent": 20, "dead-recent": 5, "later": 7} {
		if n := o.Count(t, "event_type = $1", typ); n != want {
			t.Errorf("%s: %d rows left, want %d", typ, n, want)
		}
	}
	if got := counterSum(t, r.Metrics.Cleaned); got != 295 {
		t.Errorf("cleaned counter %d, want 295", got)
	}
}

// TestRetentionCleanerStopsAtRecentRows: of the dispatched rows an older
// relay marked in place in the outbox table, with nothing (or little)
// expired, one cleaner pass reads a page or two of the primary key, not the
// whole retained history (there is no index on dispatched_at to find
// expired rows there).
func TestRetentionCleanerStopsAtRecentRows(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	ctx := context.Background()
	tbl := o.Table.Quoted()
	for _, q := range []string{
		// 300 expired, then 20,000 dispatched within the retention, with 40
		// dead rows among the old ones (kept: retention.dead is 0).
		`INSERT INTO ` + tbl + ` (event_type, payload, created_at, dispatched_at) SELECT 'old', '\x00', now() - interval '9 days', now() - interval '8 days' FROM generate_series(1, 300)`,
		`INSERT INTO ` + tbl + ` (event_type, payload, created_at, dead_at, attempts) SELECT 'dead', '\x00', now() - interval '9 days', now() - interval '8 days', 10 FROM generate_series(1, 40)`,
		`INSERT INTO ` + tbl + ` (event_type, payload, dispatched_at) SELECT 'recent', '\x00', now() FROM generate_series(1, 20000)`,
	} {
		if _, err := o.Pool.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	cfg := config(o, b)
	cfg.Retention.Dispatched = 24 * time.Hour
	cfg.Retention.BatchSize = 500
	r := testenv.NewRelay(t, cfg).Relay
	deleted, pages := relay.CleanDispatchedOnce(ctx, r, o.Pool)
	if deleted != 300 {
		t.Errorf("first pass deleted %d rows, want the 300 expired ones", deleted)
	}
	// Page 1 holds the 340 old rows and 160 recent ones (it deleted some, so
	// the walk goes on); page 2 deletes nothing and holds recent rows.
	if pages != 2 {
		t.Errorf("first pass read %d pages of 500, want 2 (the whole table is %d pages)", pages, 20340/500+1)
	}
	deleted, pages = relay.CleanDispatchedOnce(ctx, r, o.Pool)
	if deleted != 0 || pages != 1 {
		t.Errorf("second pass: deleted %d, read %d pages; want 0 and 1", deleted, pages)
	}
	for typ, want := range map[string]int{"old": 0, "dead": 40, "recent": 20000} {
		if n := o.Count(t, "event_type = $1", typ); n != want {
			t.Errorf("%s: %d rows left, want %d", typ, n, want)
		}
	}
}
