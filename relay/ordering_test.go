package relay_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/outbox-relay/outbox-relay/internal/ops"
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

// TestOrderedIgnoresOtherTransactions: transactions that hold transaction
// ids but have not written to this outbox table (one on another table, one
// that wrote to another outbox) stay open while keyed events are written
// and committed; the relay publishes them in order without waiting for
// those transactions. A horizon built on the snapshot's xmin would wait.
func TestOrderedIgnoresOtherTransactions(t *testing.T) {
	t.Parallel()
	o, other, b := testenv.NewOutbox(t), testenv.NewOutbox(t), testenv.NewBroker(t)
	deliveries := b.Consume(t, b.Queue(t, "#", nil))
	ctx := context.Background()

	elsewhere, err := o.Pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer elsewhere.Rollback(ctx)
	if _, err := elsewhere.Exec(ctx, `CREATE TABLE `+o.Schema+`.domain (id int); INSERT INTO `+o.Schema+`.domain VALUES (1)`); err != nil {
		t.Fatal(err)
	}
	otherWriter, err := other.Pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer otherWriter.Rollback(ctx)
	wo, _ := outbox.NewWriter(other.Schema, other.Table.Name)
	if err := wo.Write(ctx, otherWriter, outbox.NewEvent("lesson.published", []byte(`{}`))); err != nil {
		t.Fatal(err)
	}
	// They hold back the cluster's oldest running transaction id.
	var held bool
	if err := o.Pool.QueryRow(ctx, `SELECT pg_snapshot_xmin(pg_current_snapshot()) <= $1::text::xid8`, txID(t, elsewhere)).Scan(&held); err != nil {
		t.Fatal(err)
	}
	if !held {
		t.Fatal("the snapshot's xmin is past the open transaction: the test would prove nothing")
	}

	start(t, orderedConfig(o, b))
	deliversOneKeyInOrder(t, o, deliveries)
}

func txID(t *testing.T, tx pgx.Tx) string {
	t.Helper()
	var id string
	if err := tx.QueryRow(context.Background(), `SELECT pg_current_xact_id()::text`).Scan(&id); err != nil {
		t.Fatal(err)
	}
	return id
}

// TestOrderedPoisonBlocksOnlyItsKey: a key whose head keeps failing holds
// back only its own later events; other keys' commit→receive latency is
// the same as without the poison; once the head is parked dead (on_dead:
// continue) the key resumes in order.
func TestOrderedPoisonBlocksOnlyItsKey(t *testing.T) {
	t.Parallel()
	// A PostgreSQL of its own: the test compares latencies, and on the
	// shared server other tests' load would add noise to one phase and not
	// the other.
	pg := testenv.StartPostgres(t)
	o, b := testenv.NewOutboxAt(t, pg.DSN()), testenv.NewBroker(t)
	deliveries := b.Consume(t, b.Queue(t, "good.#", nil))
	// The poison is retried every 1.5 to 3 s (backoff with equal jitter):
	// an event of another key that had to wait for the poison would wait
	// for one of those retries, seconds, far above a normal latency.
	const backoff = 3 * time.Second
	cfg := orderedConfig(o, b)
	cfg.Relay.MaxAttempts = 3
	cfg.Relay.RetryMinBackoff = backoff
	cfg.Relay.RetryMaxBackoff = backoff
	w, _ := outbox.NewWriter(o.Schema, o.Table.Name)
	ctx := context.Background()
	start(t, cfg)
	arrivals := stamped(deliveries)

	const poisonKey = "key-poisoned"
	keys := keysAround(t, o, poisonKey, cfg.Relay.Partitions, 10, 10)
	poison := outbox.NewEvent("nobody.listens", []byte(`{}`))
	poison.Key = poisonKey
	attempts := func() (n int, dead bool) {
		t.Helper()
		err := o.Pool.QueryRow(ctx, `SELECT attempts, dead_at IS NOT NULL FROM `+o.Table.Quoted()+` WHERE id = $1`, poison.ID).Scan(&n, &dead)
		if err != nil && !errors.Is(err, pgx.ErrNoRows) { // no row: not written yet
			t.Fatal(err)
		}
		return n, dead
	}
	committed := map[string]time.Time{}
	last := map[string]int64{} // per key, the highest seq received
	blocked := map[string]bool{}
	// phase writes one event per transaction, every 20 ms, round robin
	// over keys, until at least n are written and more() says stop; then
	// it waits for all of them and returns their commit→receive latencies.
	phase := func(name string, n int, more func() bool) []time.Duration {
		t.Helper()
		var ids []string
		for i := 0; i < n || more(); i++ {
			ev := outbox.NewEvent("good.event", fmt.Appendf(nil, `{"phase":%q,"i":%d}`, name, i))
			ev.Key = keys[i%len(keys)]
			if err := pgx.BeginFunc(ctx, o.Pool, func(tx pgx.Tx) error { return w.Write(ctx, tx, ev) }); err != nil {
				t.Fatal(err)
			}
			committed[ev.ID.String()] = time.Now()
			ids = append(ids, ev.ID.String())
			time.Sleep(20 * time.Millisecond) // pacing of the producer, not a wait for a condition
		}
		var lat []time.Duration
		for _, a := range testenv.Receive(t, arrivals, len(ids), 30*time.Second) {
			id := a.d.MessageId
			if blocked[id] {
				if _, dead := attempts(); dead {
					t.Fatalf("%s: other keys' events were still in flight when the head of %s was parked dead and its key resumed: they waited for the poison", name, poisonKey)
				}
				t.Fatalf("%s: an event behind the failing head of %s was published before the head was settled", name, poisonKey)
			}
			at, ok := committed[id]
			if !ok {
				t.Fatalf("%s: unexpected message %s", name, id)
			}
			delete(committed, id)
			key := a.d.Headers[relay.HeaderPartitionKey].(string)
			if s := seqOf(t, a.d); s <= last[key] {
				t.Fatalf("%s: key %s: seq %d after %d", name, key, s, last[key])
			} else {
				last[key] = s
			}
			lat = append(lat, a.at.Sub(at))
		}
		return lat
	}

	// Baseline: the same producer, no poison.
	base := phase("baseline", 60, func() bool { return false })

	// The poison, written after the baseline: an unroutable head with five
	// events of its key behind it.
	events := []outbox.Event{poison}
	for i := 0; i < 5; i++ {
		ev := outbox.NewEvent("good.after-poison", fmt.Appendf(nil, `{"i":%d}`, i))
		ev.Key = poisonKey
		events = append(events, ev)
		blocked[ev.ID.String()] = true
	}
	if err := pgx.BeginFunc(ctx, o.Pool, func(tx pgx.Tx) error { return w.Write(ctx, tx, events...) }); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 10*time.Second, "the poison failed once", func() bool { n, _ := attempts(); return n >= 1 })

	// With the poison retrying: the phase lasts until the relay has claimed
	// and failed the poison again (a retry among the other keys' events)
	// and 300 ms beyond, so events claimed beside the retry are measured.
	retried := time.Time{}
	giveUp := time.Now().Add(2*backoff + 10*time.Second)
	poisoned := phase("poisoned", 60, func() bool {
		n, dead := attempts()
		switch {
		case dead:
			t.Fatalf("the poison is dead after %d attempts before the poisoned phase ended: the test proves nothing", n)
		case n >= 2 && retried.IsZero():
			retried = time.Now()
		case time.Now().After(giveUp):
			t.Fatalf("the poison was not retried within %s", 2*backoff+10*time.Second)
		}
		return retried.IsZero() || time.Since(retried) < 300*time.Millisecond
	})
	if n, dead := attempts(); dead || n < 2 {
		t.Fatalf("after the poisoned phase the poison has %d attempts (dead %v); want retrying", n, dead)
	}

	// The acceptance point is a comparison of latencies, so it is timed.
	// The bound is generous, so that a loaded machine cannot fail it, and
	// still below what waiting for the poison costs: with the poison
	// retrying, the other keys' p95 must stay under max(3 × baseline p95,
	// baseline p95 + 500 ms), and under half the poison's backoff (its
	// shortest retry interval), which is what an event waiting on the
	// poison would add.
	bp, pp := percentile(base, 95), percentile(poisoned, 95)
	t.Logf("other keys' commit→receive latency: baseline p50 %s p95 %s max %s (%d events); poisoned p50 %s p95 %s max %s (%d events)",
		percentile(base, 50), bp, percentile(base, 100), len(base), percentile(poisoned, 50), pp, percentile(poisoned, 100), len(poisoned))
	if bound := max(3*bp, bp+500*time.Millisecond); pp >= bound {
		t.Errorf("with the poison retrying, other keys' p95 latency is %s, baseline %s: above %s", pp, bp, bound)
	}
	if pp >= backoff/2 {
		t.Errorf("with the poison retrying, other keys' p95 latency is %s: they waited for the poison's retries (%s to %s)", pp, backoff/2, backoff)
	}

	// Then the head is parked dead and the key resumes, in order.
	prev := int64(0)
	for _, a := range testenv.Receive(t, arrivals, 5, 20*time.Second) {
		if !blocked[a.d.MessageId] {
			t.Fatalf("unexpected message %s", a.d.MessageId)
		}
		if s := seqOf(t, a.d); s <= prev {
			t.Fatalf("%s out of order: %d after %d", poisonKey, s, prev)
		} else {
			prev = s
		}
	}
	if n := o.Count(t, "id = $1 AND dead_at IS NOT NULL AND attempts = 3", poison.ID); n != 1 {
		t.Fatal("the poisoned head is not dead after 3 attempts")
	}
	testenv.Eventually(t, 10*time.Second, "the poisoned key's events dispatched", func() bool {
		return o.Count(t, "partition_key = $1 AND dispatched_at IS NOT NULL", poisonKey) == 5
	})
	if n := o.Count(t, `partition_key = $1 AND dispatched_at <= (SELECT dead_at FROM `+o.Table.Quoted()+` WHERE id = $2)`, poisonKey, poison.ID); n != 0 {
		t.Fatalf("%d events of %s were dispatched before its head was parked dead", n, poisonKey)
	}
}

// keysAround returns same keys that hash into key's partition (of
// partitions) and other keys that do not, interleaved: a poisoned key must
// not hold back even the keys of its own partition. The hash is the
// relay's (queries.go partitionOf); should it change, the keys are still
// valid, only no longer split this way.
func keysAround(t *testing.T, o *testenv.Outbox, key string, partitions, same, other int) []string {
	t.Helper()
	rows, err := o.Pool.Query(context.Background(), `SELECT k,
  (hashtextextended(k, 0) & 2147483647) % $2 = (hashtextextended($1, 0) & 2147483647) % $2
FROM (SELECT 'key-' || i AS k FROM generate_series(0, 999) i) s`, key, partitions)
	if err != nil {
		t.Fatal(err)
	}
	var in, out []string
	var (
		k       string
		sameOne bool
	)
	if _, err := pgx.ForEachRow(rows, []any{&k, &sameOne}, func() error {
		if sameOne && len(in) < same {
			in = append(in, k)
		} else if !sameOne && len(out) < other {
			out = append(out, k)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if len(in) < same || len(out) < other {
		t.Fatalf("found %d keys in the partition of %s and %d outside; want %d and %d", len(in), key, len(out), same, other)
	}
	var keys []string
	for i := 0; i < max(same, other); i++ {
		if i < same {
			keys = append(keys, in[i])
		}
		if i < other {
			keys = append(keys, out[i])
		}
	}
	return keys
}

// arrival is a delivery with the time it was received.
type arrival struct {
	d  amqp.Delivery
	at time.Time
}

// stamped timestamps deliveries as they arrive, whenever the test reads
// them. It ends when the consumer closes at cleanup.
func stamped(d <-chan amqp.Delivery) <-chan arrival {
	out := make(chan arrival, 10000)
	go func() {
		defer close(out)
		for m := range d {
			out <- arrival{m, time.Now()}
		}
	}()
	return out
}

// percentile returns the p-th percentile (nearest rank) of ds.
func percentile(ds []time.Duration, p int) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := (len(s)*p+99)/100 - 1
	return s[max(0, min(i, len(s)-1))]
}

// TestOrderedOnDead: a key whose head is parked dead moves on past it with
// relay.on_dead: continue (the default), and with block stays blocked while
// the other keys flow, until an operator retries the dead row (it then goes
// first and the key follows in order) or purges it (the key moves on).
func TestOrderedOnDead(t *testing.T) {
	t.Parallel()
	t.Run("block", func(t *testing.T) {
		t.Parallel()
		testOnDeadBlock(t)
	})
	t.Run("continue", func(t *testing.T) {
		t.Parallel()
		testOnDeadContinue(t)
	})
}

// deadHeads is a table where two keys start with a head that dies at its
// first attempt, five events behind each, and ten healthy keys of five
// events each.
type deadHeads struct {
	o          *testenv.Outbox
	b          *testenv.Broker
	queue      string
	deliveries <-chan amqp.Delivery
	unroutable string              // id of the head of keyUnroutable: nothing bound to its type
	invalid    string              // id of the head of keyInvalid: headers the relay cannot send
	behind     map[string][]string // key → ids of the events behind its dead head, in seq order
	healthy    map[string]bool     // ids of the healthy keys' events
	last       map[string]int64    // per key, the highest seq received
}

const (
	keyUnroutable = "key-unroutable"
	keyInvalid    = "key-invalid"
)

func newDeadHeads(t *testing.T, onDead string) *deadHeads {
	t.Helper()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	s := &deadHeads{o: o, b: b, queue: b.Queue(t, "good.#", nil), behind: map[string][]string{},
		healthy: map[string]bool{}, last: map[string]int64{}}
	s.deliveries = b.Consume(t, s.queue)
	w, _ := outbox.NewWriter(o.Schema, o.Table.Name)
	ctx := context.Background()
	// Each statement draws its seqs after the previous one's: the heads
	// come first in their keys.
	err := pgx.BeginFunc(ctx, o.Pool, func(tx pgx.Tx) error {
		head := outbox.NewEvent("held.event", []byte(`{}`))
		head.Key = keyUnroutable
		if err := w.Write(ctx, tx, head); err != nil {
			return err
		}
		s.unroutable = head.ID.String()
		// A header name longer than an AMQP short string, as only a plain
		// SQL writer can store: the row is invalid and dies at once.
		if err := tx.QueryRow(ctx, `INSERT INTO `+o.Table.Quoted()+` (event_type, partition_key, payload, headers)
			VALUES ('good.bad-headers', $1, '\x00', jsonb_build_object(repeat('h', 256), 1)) RETURNING id::text`, keyInvalid).Scan(&s.invalid); err != nil {
			return err
		}
		var events []outbox.Event
		for _, key := range []string{keyUnroutable, keyInvalid} {
			for i := 0; i < 5; i++ {
				ev := outbox.NewEvent("good.after-dead", fmt.Appendf(nil, `{"key":%q,"i":%d}`, key, i))
				ev.Key = key
				events = append(events, ev)
			}
		}
		for k := 0; k < 10; k++ {
			for i := 0; i < 5; i++ {
				ev := outbox.NewEvent("good.event", fmt.Appendf(nil, `{"k":%d,"i":%d}`, k, i))
				ev.Key = fmt.Sprint("key-", k)
				events = append(events, ev)
				s.healthy[ev.ID.String()] = true
			}
		}
		return w.Write(ctx, tx, events...)
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{keyUnroutable, keyInvalid} {
		rows, err := o.Pool.Query(ctx, `SELECT id::text FROM `+o.Table.Quoted()+` WHERE partition_key = $1 ORDER BY seq OFFSET 1`, key)
		if err != nil {
			t.Fatal(err)
		}
		if s.behind[key], err = pgx.CollectRows(rows, pgx.RowTo[string]); err != nil {
			t.Fatal(err)
		}
	}
	cfg := orderedConfig(o, b)
	cfg.Relay.OnDead = onDead
	cfg.Relay.MaxAttempts = 1
	start(t, cfg)
	return s
}

// receive takes n deliveries and checks each key's order; accept says
// which ids may arrive.
func (s *deadHeads) receive(t *testing.T, n int, accept func(id string) bool) []amqp.Delivery {
	t.Helper()
	got := testenv.Receive(t, s.deliveries, n, 20*time.Second)
	for _, d := range got {
		if !accept(d.MessageId) {
			t.Fatalf("unexpected message %s (%s, key %v)", d.MessageId, d.Type, d.Headers[relay.HeaderPartitionKey])
		}
		key, _ := d.Headers[relay.HeaderPartitionKey].(string)
		if seq := seqOf(t, d); seq <= s.last[key] {
			t.Fatalf("key %s: seq %d after %d", key, seq, s.last[key])
		} else {
			s.last[key] = seq
		}
	}
	return got
}

// headsDead waits until both heads are parked dead, at their first attempt.
func (s *deadHeads) headsDead(t *testing.T) {
	t.Helper()
	testenv.Eventually(t, 20*time.Second, "both heads dead", func() bool {
		return s.o.Count(t, "id = ANY($1::uuid[]) AND dead_at IS NOT NULL AND attempts = 1", []string{s.unroutable, s.invalid}) == 2
	})
}

// inOrder checks that the deliveries are exactly ids, in that order.
func inOrder(t *testing.T, got []amqp.Delivery, ids []string) {
	t.Helper()
	for i, d := range got {
		if d.MessageId != ids[i] {
			t.Fatalf("message %d is %s (%s), want %s", i, d.MessageId, d.Type, ids[i])
		}
	}
}

func testOnDeadBlock(t *testing.T) {
	s := newDeadHeads(t, relay.OnDeadBlock)
	o, ctx, tbl := s.o, context.Background(), s.o.Table.Quoted()
	isBehind := func(key string) func(string) bool {
		return func(id string) bool { return slices.Contains(s.behind[key], id) }
	}
	stillBlocked := func(key string) {
		t.Helper()
		if n := o.Count(t, "id = ANY($1::uuid[]) AND dispatched_at IS NULL AND dead_at IS NULL AND attempts = 0", s.behind[key]); n != 5 {
			t.Fatalf("%s: %d of the 5 events behind the dead head are still untouched, want 5", key, n)
		}
	}

	// Every healthy key flows; nothing behind a dead head does.
	s.receive(t, 50, func(id string) bool { return s.healthy[id] })
	s.headsDead(t)
	// More events of the healthy keys, written after both heads died:
	// once they are dispatched, the relay has claimed since the deaths,
	// and a claim takes every due head up to its batch size in seq order,
	// so it would have taken the events behind the dead heads too.
	w, _ := outbox.NewWriter(o.Schema, o.Table.Name)
	var more []outbox.Event
	for k := 0; k < 10; k++ {
		ev := outbox.NewEvent("good.event", fmt.Appendf(nil, `{"k":%d,"after":"deaths"}`, k))
		ev.Key = fmt.Sprint("key-", k)
		more = append(more, ev)
		s.healthy[ev.ID.String()] = true
	}
	if err := pgx.BeginFunc(ctx, o.Pool, func(tx pgx.Tx) error { return w.Write(ctx, tx, more...) }); err != nil {
		t.Fatal(err)
	}
	s.receive(t, 10, func(id string) bool { return s.healthy[id] })
	testenv.Eventually(t, 10*time.Second, "the healthy keys' events dispatched", func() bool {
		return o.Count(t, "event_type = 'good.event' AND dispatched_at IS NOT NULL") == 60
	})
	stillBlocked(keyUnroutable)
	stillBlocked(keyInvalid)
	if d, quiet := testenv.Quiet(s.deliveries, 300*time.Millisecond); !quiet {
		t.Fatalf("%s published behind a dead head", d.MessageId)
	}

	// The operator binds the missing route and retries the dead head (what
	// `outbox-relay dead retry --id` does): it goes first, then its key
	// follows in order. The other blocked key stays blocked.
	bindQueue(t, s.b, s.queue, "held.#")
	if tag, err := o.Pool.Exec(ctx, `UPDATE `+tbl+` SET attempts = 0, dead_at = NULL, available_at = now()
		WHERE id = $1 AND dead_at IS NOT NULL`, s.unroutable); err != nil || tag.RowsAffected() != 1 {
		t.Fatalf("dead retry: %v (%d rows)", err, tag.RowsAffected())
	}
	want := append([]string{s.unroutable}, s.behind[keyUnroutable]...)
	inOrder(t, s.receive(t, 6, func(id string) bool { return slices.Contains(want, id) }), want)
	testenv.Eventually(t, 10*time.Second, keyUnroutable+" dispatched", func() bool {
		return o.Count(t, "partition_key = $1 AND dispatched_at IS NOT NULL", keyUnroutable) == 6
	})
	stillBlocked(keyInvalid)

	// The operator purges the other dead head (`outbox-relay dead purge`):
	// its key moves on, in order.
	if tag, err := o.Pool.Exec(ctx, `DELETE FROM `+tbl+` WHERE id = $1 AND dead_at IS NOT NULL`, s.invalid); err != nil || tag.RowsAffected() != 1 {
		t.Fatalf("dead purge: %v (%d rows)", err, tag.RowsAffected())
	}
	inOrder(t, s.receive(t, 5, isBehind(keyInvalid)), s.behind[keyInvalid])
	testenv.Eventually(t, 10*time.Second, "every row dispatched", func() bool {
		// 60 healthy, the retried head and its 5, the 5 behind the purged head.
		return o.Count(t, "dispatched_at IS NOT NULL") == 71 && o.Count(t, "true") == 71
	})
	if d, quiet := testenv.Quiet(s.deliveries, 300*time.Millisecond); !quiet {
		t.Fatalf("unexpected message %s", d.MessageId)
	}
}

func testOnDeadContinue(t *testing.T) {
	s := newDeadHeads(t, relay.OnDeadContinue)
	o := s.o
	// Everything but the two dead heads arrives, each key in order.
	behind := func(id string) bool {
		return slices.Contains(s.behind[keyUnroutable], id) || slices.Contains(s.behind[keyInvalid], id)
	}
	s.receive(t, 60, func(id string) bool { return s.healthy[id] || behind(id) })
	s.headsDead(t)
	testenv.Eventually(t, 10*time.Second, "all but the dead heads dispatched", func() bool {
		return o.Count(t, "dispatched_at IS NOT NULL") == 60
	})
	// The events behind a head went out only after it was parked dead.
	for _, key := range []string{keyUnroutable, keyInvalid} {
		if n := o.Count(t, `partition_key = $1 AND dispatched_at IS NOT NULL AND dispatched_at <= (
			SELECT dead_at FROM `+o.Table.Quoted()+` WHERE partition_key = $1 AND dead_at IS NOT NULL)`, key); n != 0 {
			t.Fatalf("%s: %d events dispatched before the head was parked dead", key, n)
		}
	}
	if d, quiet := testenv.Quiet(s.deliveries, 300*time.Millisecond); !quiet {
		t.Fatalf("unexpected message %s (%s)", d.MessageId, d.Type)
	}
}

// bindQueue binds queue to the test's exchange with one more binding key.
func bindQueue(t *testing.T, b *testenv.Broker, queue, key string) {
	t.Helper()
	withChannel(t, b.URL, func(ch *amqp.Channel) error {
		if err := ch.QueueBind(queue, key, b.Exchange, false, nil); err != nil {
			return fmt.Errorf("bind %s to %s: %w", key, queue, err)
		}
		return nil
	})
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
		list, err := ops.PartitionOwners(ctx, o.Pool, o.Schema, o.Table.Name)
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
	if err := r1.Stop(); err != nil {
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

// deliversOneKeyInOrder writes five events of one key, each in a
// transaction of its own, and fails unless they arrive in that order.
func deliversOneKeyInOrder(t *testing.T, o *testenv.Outbox, deliveries <-chan amqp.Delivery) {
	t.Helper()
	ctx := context.Background()
	w, _ := outbox.NewWriter(o.Schema, o.Table.Name)
	var want []string
	for i := range 5 {
		e := outbox.NewEvent("lesson.updated", fmt.Appendf(nil, `{"step":%d}`, i))
		e.Key = "lesson-1"
		want = append(want, e.ID.String())
		if err := pgx.BeginFunc(ctx, o.Pool, func(tx pgx.Tx) error { return w.Write(ctx, tx, e) }); err != nil {
			t.Fatal(err)
		}
	}
	got := testenv.Receive(t, deliveries, len(want), 10*time.Second)
	for i, d := range got {
		if d.MessageId != want[i] {
			t.Fatalf("message %d is %s, want %s", i, d.MessageId, want[i])
		}
	}
}
