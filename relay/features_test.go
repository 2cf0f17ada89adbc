package relay_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
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
