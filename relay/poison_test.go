package relay_test

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
)

// TestPoisonEvents: among 10,000 good events, one unroutable type and one
// payload above the broker's max message size. Every good event arrives, the
// two poison rows end dead with a last_error naming the reason, and the
// relay never stalls on them.
func TestPoisonEvents(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	deliveries := b.Consume(t, b.Queue(t, "good.#", nil))
	cfg := config(o, b)
	cfg.AMQP.MaxMessageSize = 1 << 20 // as a broker with max_message_size = 1 MiB
	cfg.Relay.MaxAttempts = 3
	cfg.Relay.RetryMinBackoff = 10 * time.Millisecond
	cfg.Relay.RetryMaxBackoff = 20 * time.Millisecond
	r := start(t, cfg)

	w, _ := outbox.NewWriter(o.Schema, o.Table.Name)
	ctx := context.Background()
	unroutable := outbox.NewEvent("nobody.listens", []byte(`{}`))
	oversized := outbox.NewEvent("good.huge", bytes.Repeat([]byte("x"), 2<<20))
	const good = 10000
	for txn := 0; txn < good/500; txn++ {
		events := make([]outbox.Event, 0, 501)
		for i := 0; i < 500; i++ {
			events = append(events, outbox.NewEvent("good.event", fmt.Appendf(nil, `{"n":%d}`, txn*500+i)))
		}
		switch txn {
		case 3:
			events = append(events, unroutable)
		case 7:
			events = append(events, oversized)
		}
		if err := pgx.BeginFunc(ctx, o.Pool, func(tx pgx.Tx) error { return w.Write(ctx, tx, events...) }); err != nil {
			t.Fatal(err)
		}
	}
	got := testenv.Receive(t, deliveries, good, time.Minute)
	seen := map[string]bool{}
	for _, d := range got {
		if d.MessageId == oversized.ID.String() {
			t.Fatal("the oversized event was published")
		}
		seen[d.MessageId] = true
	}
	if len(seen) != good {
		t.Fatalf("%d distinct good events, want %d", len(seen), good)
	}
	testenv.Eventually(t, 30*time.Second, "both poison rows dead", func() bool {
		return o.Count(t, "dead_at IS NOT NULL") == 2
	})
	for _, c := range []struct {
		ev       outbox.Event
		reason   string
		attempts int
	}{{unroutable, "unroutable", 3}, {oversized, "too_large", 1}} {
		var lastErr string
		var attempts int
		if err := o.Pool.QueryRow(ctx, `SELECT last_error, attempts FROM `+o.Table.Quoted()+` WHERE id = $1`, c.ev.ID).Scan(&lastErr, &attempts); err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(lastErr, c.reason) || attempts != c.attempts {
			t.Errorf("%s: last_error %q after %d attempts; want %q after %d", c.ev.Type, lastErr, attempts, c.reason, c.attempts)
		}
	}
	testenv.Eventually(t, 10*time.Second, "every good row dispatched", func() bool {
		return o.Count(t, "dispatched_at IS NOT NULL") == good
	})
	if err := r.Ready(); err != nil {
		t.Fatalf("relay not ready after poison events: %v", err)
	}
}

// TestPoisonRowsFromSQL: rows a plain-SQL writer can insert but AMQP cannot
// carry (a nested header name, a correlation id or a content type over 255
// bytes) are parked dead at once as invalid, and the good rows written after
// them are delivered. Such a row used to reach the AMQP encoder, which closed
// the connection: the relay took it for a broker outage and retried the row,
// first in every batch, forever.
func TestPoisonRowsFromSQL(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	deliveries := b.Consume(t, b.Queue(t, "#", nil))
	r := start(t, config(o, b))
	ctx := context.Background()
	long := strings.Repeat("n", 256)
	tbl := o.Table.Quoted()
	for _, q := range []string{
		`INSERT INTO ` + tbl + ` (event_type, payload, headers) VALUES ('bad.header', '{}', jsonb_build_object('outer', jsonb_build_object('` + long + `', 1)))`,
		`INSERT INTO ` + tbl + ` (event_type, payload, correlation_id) VALUES ('bad.correlation', '{}', '` + long + `')`,
		`INSERT INTO ` + tbl + ` (event_type, payload, content_type) VALUES ('bad.content_type', '{}', '` + long + `')`,
		`INSERT INTO ` + tbl + ` (event_type, payload) SELECT 'good.event', '{}' FROM generate_series(1, 20)`,
	} {
		if _, err := o.Pool.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range testenv.Receive(t, deliveries, 20, 30*time.Second) {
		if d.Type != "good.event" {
			t.Fatalf("received %s: a row AMQP cannot carry was published", d.Type)
		}
	}
	testenv.Eventually(t, 10*time.Second, "the three bad rows dead, the good ones dispatched", func() bool {
		return o.Count(t, "dead_at IS NOT NULL AND attempts = 1 AND last_error LIKE 'invalid%'") == 3 &&
			o.Count(t, "dispatched_at IS NOT NULL") == 20
	})
	for typ, want := range map[string]string{"bad.header": "header name", "bad.correlation": "correlation_id", "bad.content_type": "content_type"} {
		if n := o.Count(t, "event_type = $1 AND last_error LIKE '%' || $2 || '%'", typ, want); n != 1 {
			t.Errorf("%s: last_error does not name %q", typ, want)
		}
	}
	if n := counterSum(t, r.Metrics.Reconnects); n != 0 {
		t.Errorf("%d reconnects: a bad row must not drop the broker link", n)
	}
	if err := r.Ready(); err != nil {
		t.Fatalf("relay not ready: %v", err)
	}
}
