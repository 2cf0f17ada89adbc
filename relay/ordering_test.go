package relay_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
)

func orderedConfig(o *testenv.Outbox, b *testenv.Broker) relay.Config {
	cfg := config(o, b)
	cfg.Relay.Ordering = relay.OrderingPartitionKey
	cfg.Relay.Partitions = 8
	return cfg
}

func seqOf(t *testing.T, d amqp.Delivery) int64 {
	t.Helper()
	s, ok := d.Headers[relay.HeaderSeq].(int64)
	if !ok {
		t.Fatalf("message %s has no %s header", d.MessageId, relay.HeaderSeq)
	}
	return s
}

// TestOrderedWaitsForLowerSeqToCommit: T1 inserts an event of key K and
// stays open; T2 inserts a later event of K and commits first. The relay
// must not publish T2's event until T1 has committed, then both in order.
// In the second case T2 took its transaction id before T1 did, so T1 holds
// the newest id: a snapshot's xmax (latest completed id + 1) then does not
// cover it, which is the trap a horizon built on xmax falls into.
func TestOrderedWaitsForLowerSeqToCommit(t *testing.T) {
	t.Parallel()
	for _, laterTookIDFirst := range []bool{false, true} {
		t.Run(fmt.Sprint("later_writer_took_id_first=", laterTookIDFirst), func(t *testing.T) {
			t.Parallel()
			testOrderedWaits(t, laterTookIDFirst)
		})
	}
}

func testOrderedWaits(t *testing.T, laterTookIDFirst bool) {
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	deliveries := b.Consume(t, b.Queue(t, "#", nil))
	w, _ := outbox.NewWriter(o.Schema, o.Table.Name)
	ctx := context.Background()
	start(t, orderedConfig(o, b))

	first := outbox.NewEvent("lesson.published", []byte(`{"step":1}`))
	first.Key = "lesson-1"
	second := outbox.NewEvent("lesson.updated", []byte(`{"step":2}`))
	second.Key = "lesson-1"
	keyless := outbox.NewEvent("site.visited", []byte(`{}`))

	t2, err := o.Pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer t2.Rollback(ctx)
	if laterTookIDFirst {
		if _, err := t2.Exec(ctx, "SELECT pg_current_xact_id()"); err != nil {
			t.Fatal(err)
		}
	}
	t1, err := o.Pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer t1.Rollback(ctx)
	if err := w.Write(ctx, t1, first); err != nil {
		t.Fatal(err)
	}
	if err := w.Write(ctx, t2, second, keyless); err != nil {
		t.Fatal(err)
	}
	if err := t2.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	// Positive control: the relay runs and publishes what has no key.
	if d := testenv.Receive(t, deliveries, 1, 10*time.Second)[0]; d.MessageId != keyless.ID.String() {
		t.Fatalf("first message is %s (%s), want the keyless event: the later event of lesson-1 overtook an open transaction", d.MessageId, d.Type)
	}
	if d, quiet := testenv.Quiet(deliveries, 500*time.Millisecond); !quiet {
		t.Fatalf("%s published while a lower seq of its key was uncommitted", d.Type)
	}
	if err := t1.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	got := testenv.Receive(t, deliveries, 2, 10*time.Second)
	if got[0].MessageId != first.ID.String() || got[1].MessageId != second.ID.String() {
		t.Fatalf("order %s, %s; want %s then %s", got[0].Type, got[1].Type, first.Type, second.Type)
	}
	if seqOf(t, got[0]) >= seqOf(t, got[1]) {
		t.Fatalf("seqs %d, %d not increasing", seqOf(t, got[0]), seqOf(t, got[1]))
	}
}

// TestOrderedPoisonBlocksOnlyItsKey: a key whose head keeps failing holds
// back only its own later events; other keys flow; once the head is parked
// dead (on_dead: continue) the key resumes in order.
func TestOrderedPoisonBlocksOnlyItsKey(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	deliveries := b.Consume(t, b.Queue(t, "good.#", nil))
	cfg := orderedConfig(o, b)
	cfg.Relay.MaxAttempts = 4
	cfg.Relay.RetryMinBackoff = 300 * time.Millisecond
	cfg.Relay.RetryMaxBackoff = 300 * time.Millisecond
	w, _ := outbox.NewWriter(o.Schema, o.Table.Name)
	ctx := context.Background()

	var events []outbox.Event
	poison := outbox.NewEvent("nobody.listens", []byte(`{}`))
	poison.Key = "key-poisoned"
	events = append(events, poison)
	blocked := map[string]bool{}
	for i := 0; i < 5; i++ {
		ev := outbox.NewEvent("good.after-poison", fmt.Appendf(nil, `{"i":%d}`, i))
		ev.Key = "key-poisoned"
		events = append(events, ev)
		blocked[ev.ID.String()] = true
	}
	for k := 0; k < 20; k++ {
		for i := 0; i < 5; i++ {
			ev := outbox.NewEvent("good.event", fmt.Appendf(nil, `{"k":%d,"i":%d}`, k, i))
			ev.Key = fmt.Sprint("key-", k)
			events = append(events, ev)
		}
	}
	if err := pgx.BeginFunc(ctx, o.Pool, func(tx pgx.Tx) error { return w.Write(ctx, tx, events...) }); err != nil {
		t.Fatal(err)
	}
	start(t, cfg)
	// The 100 events of the healthy keys arrive while the poisoned head is
	// still being retried (4 attempts, 300 ms apart), in order per key.
	last := map[string]int64{}
	for _, d := range testenv.Receive(t, deliveries, 100, 20*time.Second) {
		if blocked[d.MessageId] {
			t.Fatalf("an event behind the failing head of key-poisoned was published before the head was settled")
		}
		key := d.Headers[relay.HeaderPartitionKey].(string)
		if s := seqOf(t, d); s <= last[key] {
			t.Fatalf("key %s: seq %d after %d", key, s, last[key])
		} else {
			last[key] = s
		}
	}
	if n := o.Count(t, "id = $1 AND dead_at IS NULL", poison.ID); n != 1 {
		t.Fatalf("poison already dead before the healthy keys finished; the test proves nothing")
	}
	// Then the head is parked dead and the key resumes, in order.
	prev := int64(0)
	for _, d := range testenv.Receive(t, deliveries, 5, 20*time.Second) {
		if !blocked[d.MessageId] {
			t.Fatalf("unexpected message %s", d.MessageId)
		}
		if s := seqOf(t, d); s <= prev {
			t.Fatalf("key-poisoned out of order: %d after %d", s, prev)
		} else {
			prev = s
		}
	}
	if n := o.Count(t, "id = $1 AND dead_at IS NOT NULL AND attempts = 4", poison.ID); n != 1 {
		t.Fatal("the poisoned head is not dead after 4 attempts")
	}
}

// TestPartitionLeasesSplit: two ordered replicas split the partitions
// evenly, PartitionOwners reports both, and when one stops the other takes
// every partition.
func TestPartitionLeasesSplit(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	cfg := orderedConfig(o, b)
	ctx := context.Background()
	owners := func() map[int32]int {
		list, err := relay.PartitionOwners(ctx, o.Pool, o.Schema, o.Table.Name)
		if err != nil {
			t.Fatal(err)
		}
		m := map[int32]int{}
		for _, ow := range list {
			m[ow.PID] = len(ow.Partitions)
		}
		return m
	}
	r1 := start(t, cfg)
	testenv.Eventually(t, 10*time.Second, "first replica owns all 8 partitions", func() bool {
		m := owners()
		return len(m) == 1 && sum(m) == 8
	})
	start(t, cfg)
	testenv.Eventually(t, 10*time.Second, "two replicas own 4 partitions each", func() bool {
		m := owners()
		if len(m) != 2 || sum(m) != 8 {
			return false
		}
		for _, n := range m {
			if n != 4 {
				return false
			}
		}
		return true
	})
	if err := r1.stop(); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 10*time.Second, "the survivor owns all 8", func() bool {
		m := owners()
		return len(m) == 1 && sum(m) == 8
	})
}

func sum(m map[int32]int) int {
	n := 0
	for _, v := range m {
		n += v
	}
	return n
}
