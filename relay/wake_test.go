package relay_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
)

// TestNotifyWakesIdleRelay: with a 10 s fallback poll, an event committed
// to an idle relay is on the queue within 1 s, and again after the LISTEN
// connection was killed.
func TestNotifyWakesIdleRelay(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	deliveries := b.Consume(t, b.Queue(t, "#", nil))
	ctx := context.Background()
	if _, err := o.Pool.Exec(ctx, "ALTER TABLE "+o.Table.Quoted()+" ENABLE TRIGGER "+o.Table.Local("notify")); err != nil {
		t.Fatal(err)
	}
	cfg := config(o, b)
	cfg.Wake.Mode = relay.WakeNotify
	cfg.Wake.PollInterval = 10 * time.Second
	r := start(t, cfg)
	testenv.Eventually(t, 10*time.Second, "relay ready", func() bool { return r.Ready() == nil })

	listenPID := func() int32 {
		var pid int32
		err := o.Pool.QueryRow(ctx, `SELECT coalesce(max(pid), 0) FROM pg_stat_activity WHERE query = $1`,
			"LISTEN "+pgx.Identifier{o.Table.Channel()}.Sanitize()).Scan(&pid)
		if err != nil {
			t.Fatal(err)
		}
		return pid
	}
	pid := listenPID()
	if pid == 0 {
		t.Fatal("no LISTEN connection found")
	}

	deliverWithin := func(label string) {
		t.Helper()
		ev := outbox.NewEvent("lesson.published", []byte(`{"`+label+`":true}`))
		w, _ := outbox.NewWriter(o.Schema, o.Table.Name)
		committed := time.Now()
		if err := pgx.BeginFunc(ctx, o.Pool, func(tx pgx.Tx) error { return w.Write(ctx, tx, ev) }); err != nil {
			t.Fatal(err)
		}
		select {
		case d := <-deliveries:
			if d.MessageId != ev.ID.String() {
				t.Fatalf("%s: got message %s, want %s", label, d.MessageId, ev.ID)
			}
			t.Logf("%s: committed → received in %s", label, time.Since(committed))
		case <-time.After(time.Second):
			t.Fatalf("%s: event not delivered within 1s (NOTIFY did not wake the relay)", label)
		}
	}
	deliverWithin("first")

	if _, err := o.Pool.Exec(ctx, "SELECT pg_terminate_backend($1)", pid); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 10*time.Second, "LISTEN connection re-established", func() bool {
		p := listenPID()
		return p != 0 && p != pid
	})
	deliverWithin("after-reconnect")
}

// TestFailedPublishStaysPending: rows whose publish was nacked or returned
// stay pending with attempts and last_error, while the good row of the same
// batch is dispatched.
func TestFailedPublishStaysPending(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	b.Queue(t, "good.#", nil)
	// A queue that refuses everything: publishes routed to it are nacked.
	b.Queue(t, "full.#", amqp.Table{"x-max-length": int32(0), "x-overflow": "reject-publish"})
	cfg := config(o, b)
	cfg.Relay.RetryMinBackoff = time.Hour // no retry during the test
	cfg.Relay.RetryMaxBackoff = time.Hour
	w, _ := outbox.NewWriter(o.Schema, o.Table.Name)
	ctx := context.Background()
	good := outbox.NewEvent("good.event", []byte(`{}`))
	nacked := outbox.NewEvent("full.event", []byte(`{}`))
	returned := outbox.NewEvent("nobody.listens", []byte(`{}`))
	if err := pgx.BeginFunc(ctx, o.Pool, func(tx pgx.Tx) error { return w.Write(ctx, tx, good, nacked, returned) }); err != nil {
		t.Fatal(err)
	}
	start(t, cfg)
	testenv.Eventually(t, 20*time.Second, "both failures recorded", func() bool {
		return o.Count(t, "attempts = 1 AND last_error IS NOT NULL") == 2
	})
	check := func(ev outbox.Event, wantErr string) {
		t.Helper()
		var (
			attempts     int
			lastErr      *string
			dispatched   bool
			availableNow bool
		)
		err := o.Pool.QueryRow(ctx, `SELECT attempts, last_error, dispatched_at IS NOT NULL, available_at <= now()
			FROM `+o.Table.Quoted()+` WHERE id = $1`, ev.ID).Scan(&attempts, &lastErr, &dispatched, &availableNow)
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case wantErr == "" && (!dispatched || attempts != 0):
			t.Fatalf("%s: dispatched=%v attempts=%d, want dispatched at the first attempt", ev.Type, dispatched, attempts)
		case wantErr != "" && (dispatched || attempts != 1 || lastErr == nil || !strings.HasPrefix(*lastErr, wantErr) || availableNow):
			t.Fatalf("%s: dispatched=%v attempts=%d last_error=%v due now=%v; want pending, 1 attempt, %q..., retry later",
				ev.Type, dispatched, attempts, deref(lastErr), availableNow, wantErr)
		}
	}
	testenv.Eventually(t, 10*time.Second, "good event dispatched", func() bool {
		return o.Count(t, "id = $1 AND dispatched_at IS NOT NULL", good.ID) == 1
	})
	check(good, "")
	check(nacked, "nack")
	check(returned, "unroutable")
}

func deref(s *string) string {
	if s == nil {
		return "<nil>"
	}
	return *s
}
