package relay_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/schema"
)

// TestRoutingOverrides: a row's routing_key and exchange (from the Go helper
// or plain SQL) choose where it is published; rows without them keep
// amqp.exchange and the event type; a row naming an exchange that
// amqp.exchanges does not list is parked dead at once, naming the key to
// fix, without stalling the rows after it or dropping the broker link.
func TestRoutingOverrides(t *testing.T) {
	t.Parallel()
	o, b, other := testenv.NewOutbox(t), testenv.NewBroker(t), testenv.NewBroker(t)
	main := b.Consume(t, b.Queue(t, "#", nil))
	routed := other.Consume(t, other.Queue(t, "tenant-7", nil)) // only the override key
	cfg := config(o, b)
	cfg.AMQP.Exchanges = []string{other.Exchange}
	r := start(t, cfg)
	w, _ := outbox.NewWriter(o.Schema, o.Table.Name)
	ctx := context.Background()

	plain := outbox.NewEvent("lesson.published", []byte(`{"n":1}`))
	keyed := outbox.NewEvent("lesson.published", []byte(`{"n":2}`))
	keyed.RoutingKey = "region.eu"
	moved := outbox.NewEvent("invoice.paid", []byte(`{"n":3}`))
	moved.Exchange, moved.RoutingKey = other.Exchange, "tenant-7"
	unlisted := outbox.NewEvent("invoice.paid", []byte(`{"n":4}`))
	unlisted.Exchange = "not.listed"
	if err := pgx.BeginFunc(ctx, o.Pool, func(tx pgx.Tx) error { return w.Write(ctx, tx, plain, keyed, moved, unlisted) }); err != nil {
		t.Fatal(err)
	}
	if _, err := o.Pool.Exec(ctx, `INSERT INTO `+o.Table.Quoted()+` (event_type, payload, routing_key, exchange)
		VALUES ('invoice.refunded', '{"n":5}', 'tenant-7', $1)`, other.Exchange); err != nil {
		t.Fatal(err)
	}
	after := outbox.NewEvent("lesson.published", []byte(`{"n":6}`))
	if err := pgx.BeginFunc(ctx, o.Pool, func(tx pgx.Tx) error { return w.Write(ctx, tx, after) }); err != nil {
		t.Fatal(err)
	}

	wantMain := map[string]string{plain.ID.String(): "lesson.published", keyed.ID.String(): "region.eu", after.ID.String(): "lesson.published"}
	for _, d := range testenv.Receive(t, main, 3, 20*time.Second) {
		if key, ok := wantMain[d.MessageId]; !ok || d.RoutingKey != key || d.Exchange != b.Exchange || d.Type != "lesson.published" {
			t.Errorf("on %s: message %s type %s key %s; want one of %v by its key", d.Exchange, d.MessageId, d.Type, d.RoutingKey, wantMain)
		}
	}
	types := map[string]bool{}
	for _, d := range testenv.Receive(t, routed, 2, 20*time.Second) {
		if d.Exchange != other.Exchange || d.RoutingKey != "tenant-7" {
			t.Errorf("routed %s arrived on %s with key %s", d.Type, d.Exchange, d.RoutingKey)
		}
		types[d.Type] = true
	}
	if !types["invoice.paid"] || !types["invoice.refunded"] {
		t.Errorf("routed types %v: want the helper's and the SQL row", types)
	}
	testenv.Eventually(t, 10*time.Second, "the unlisted row dead after one attempt, the others dispatched", func() bool {
		return o.Count(t, "dead_at IS NOT NULL AND attempts = 1 AND last_error LIKE 'invalid%not.listed%amqp.exchanges%'") == 1 &&
			o.Count(t, "dispatched_at IS NOT NULL") == 5
	})
	if _, ok := testenv.Quiet(main, 200*time.Millisecond); !ok {
		t.Error("an extra message arrived on the main exchange")
	}
	if n := counterSum(t, r.Metrics.Reconnects); n != 0 {
		t.Errorf("%d reconnects: a row naming an unknown exchange must not drop the broker link", n)
	}
	if err := r.Ready(); err != nil {
		t.Errorf("relay not ready: %v", err)
	}
}

// TestRoutedExchangeMissing: with amqp.declare_exchange false, an exchange of
// amqp.exchanges that does not exist keeps the broker link down, naming it,
// and nothing is published or charged; once it exists, events flow.
func TestRoutedExchangeMissing(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	main := b.Consume(t, b.Queue(t, "#", nil))
	missing := testenv.Name("x")
	b.DeleteAtCleanup(t, missing)
	cfg := config(o, b)
	cfg.AMQP.Exchanges = []string{missing}
	r := start(t, cfg)
	if _, err := o.Pool.Exec(context.Background(), `INSERT INTO `+o.Table.Quoted()+` (event_type, payload) VALUES ('a', '{}')`); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 10*time.Second, "not ready, naming the missing exchange", func() bool {
		err := r.Ready()
		return err != nil && containsAll(err.Error(), missing, "amqp.exchanges")
	})
	if n := o.Count(t, "attempts > 0 OR dispatched_at IS NOT NULL"); n != 0 {
		t.Fatalf("%d rows touched while the link was down", n)
	}
	ch := b.Channel(t)
	if err := ch.ExchangeDeclare(missing, "topic", false, true, false, false, nil); err != nil {
		t.Fatal(err)
	}
	testenv.Receive(t, main, 1, 20*time.Second)
}

// TestSchemaOutdated: a relay against a table without the routing columns
// (migrations not applied) stops at start with ErrSchemaOutdated, saying
// to run the migrations, instead of failing every claim.
func TestSchemaOutdated(t *testing.T) {
	t.Parallel()
	err := runAtVersion(t, 2)
	if !errors.Is(err, relay.ErrSchemaOutdated) || !containsAll(err.Error(), "migrate up") {
		t.Fatalf("Run = %v, want ErrSchemaOutdated saying to run the migrations", err)
	}
}

// runAtVersion runs a relay against a new outbox table migrated down to
// version and returns what Run returned (within 20 s).
func runAtVersion(t *testing.T, version int64) error {
	t.Helper()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	db := stdlib.OpenDBFromPool(o.Pool)
	defer db.Close()
	m, err := schema.NewMigrator(db, o.Schema, o.Table.Name)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.DownTo(context.Background(), version); err != nil {
		t.Fatal(err)
	}
	r := testenv.NewRelay(t, config(o, b))
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	return r.Run(ctx)
}

func containsAll(s string, parts ...string) bool {
	for _, p := range parts {
		if !strings.Contains(s, p) {
			return false
		}
	}
	return true
}
