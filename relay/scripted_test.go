package relay_test

import (
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/relay/relaytest"
)

// scriptedRelay runs a relay for o on a fake broker that follows script,
// retrying failed rows quickly, once ten events are written; it returns the
// fake and the events.
func scriptedRelay(t *testing.T, o *testenv.Outbox, script func(f *relaytest.Fake, first uuid.UUID)) (*relaytest.Fake, map[string]outbox.Event) {
	t.Helper()
	events := o.WriteEvents(t, "scripted", 10)
	var first uuid.UUID
	for _, ev := range events {
		first = ev.ID
		break
	}
	fake := relaytest.NewFake()
	script(fake, first)
	declare := false
	cfg := relay.Config{
		Postgres: relay.PostgresConfig{DSN: o.DSN, Schema: o.Schema, Table: o.Table.Name},
		AMQP:     relay.AMQPConfig{URL: "amqp://relaytest.invalid/", Exchange: "relaytest", DeclareExchange: &declare},
		Relay: relay.EngineConfig{ShutdownTimeout: 5 * time.Second,
			RetryMinBackoff: 10 * time.Millisecond, RetryMaxBackoff: 20 * time.Millisecond},
	}
	testenv.StartRelay(t, cfg, testenv.WithPublisher(fake))
	testenv.Eventually(t, 20*time.Second, "every event dispatched", func() bool {
		return o.Count(t, "dispatched_at IS NOT NULL") == len(events)
	})
	return fake, events
}

// sends counts how many times the fake was sent each message.
func sends(f *relaytest.Fake) map[uuid.UUID]int {
	n := map[uuid.UUID]int{}
	for _, m := range f.Sent() {
		n[m.ID]++
	}
	return n
}

// TestNackRetriesOnlyThatMessage: when the broker nacks exactly one message
// of a batch, that row alone is retried and charged one attempt, with the
// nack as its last error; the rest of the batch is marked dispatched at
// once and never sent again.
func TestNackRetriesOnlyThatMessage(t *testing.T) {
	t.Parallel()
	o := testenv.NewOutbox(t)
	fake, events := scriptedRelay(t, o, func(f *relaytest.Fake, first uuid.UUID) { f.Script(first, relaytest.Nack) })
	var nacked uuid.UUID
	for id, n := range sends(fake) {
		switch {
		case n == 2 && nacked == uuid.Nil:
			nacked = id
		case n != 1:
			t.Errorf("message %s sent %d times, want once (or twice for the one nacked)", id, n)
		}
	}
	if nacked == uuid.Nil {
		t.Fatal("no message was sent twice: the nacked one was not retried")
	}
	if _, ok := events[nacked.String()]; !ok {
		t.Fatalf("retried message %s is not one of the events written", nacked)
	}
	if n := o.Count(t, "id = $1 AND attempts = 1 AND starts_with(last_error, 'nack')", nacked); n != 1 {
		t.Errorf("the nacked row: %d rows with attempts 1 and a nack as last error, want 1", n)
	}
	if n := o.Count(t, "id <> $1 AND attempts = 0", nacked); n != len(events)-1 {
		t.Errorf("%d other rows without attempts, want %d", n, len(events)-1)
	}
}

// TestConnectionLossChargesNoAttempt: a link lost in the middle of a batch
// fails the rest of it as a connection failure, which charges no attempt:
// every row is dispatched with attempts 0, the lost ones after a new
// connection, and the ones confirmed before the loss are not sent again.
func TestConnectionLossChargesNoAttempt(t *testing.T) {
	t.Parallel()
	o := testenv.NewOutbox(t)
	fake, events := scriptedRelay(t, o, func(f *relaytest.Fake, first uuid.UUID) { f.Script(first, relaytest.ConnectionLoss) })
	if n := o.Count(t, "attempts = 0"); n != len(events) {
		t.Errorf("%d rows without attempts, want all %d: a lost link is no fault of the message", n, len(events))
	}
	if n := fake.Connects(); n < 2 {
		t.Errorf("%d connections, want a reconnect after the loss", n)
	}
	// The batch was claimed in seq order: what came before the lost
	// message was confirmed once; it and what followed went twice.
	sent := fake.Sent()
	twice := 0
	for id, n := range sends(fake) {
		if n > 2 || n < 1 {
			t.Errorf("message %s sent %d times, want once or twice", id, n)
		}
		if n == 2 {
			twice++
		}
	}
	if twice == 0 || len(sent) != len(events)+twice {
		t.Errorf("%d sends for %d events, %d of them twice", len(sent), len(events), twice)
	}
}
