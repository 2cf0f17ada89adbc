package ops_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap/zaptest"

	"github.com/outbox-relay/outbox-relay/internal/ops"
	"github.com/outbox-relay/outbox-relay/internal/outboxsql"
	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
)

// TestReplay re-publishes dispatched events selected by type and seq range,
// to another exchange, marked as replays, resuming from where a cancelled
// replay stopped.
func TestReplay(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	live := b.Consume(t, b.Queue(t, "#", nil))
	testenv.StartRelay(t, testenv.RelayConfig(o, b))
	w, _ := outbox.NewWriter(o.Schema, o.Table.Name)
	ctx := context.Background()
	var events []outbox.Event
	for i := 0; i < 300; i++ {
		events = append(events, outbox.NewEvent([]string{"lesson.published", "quiz.submitted"}[i%2], fmt.Appendf(nil, `{"i":%d}`, i)))
	}
	if err := pgx.BeginFunc(ctx, o.Pool, func(tx pgx.Tx) error { return w.Write(ctx, tx, events...) }); err != nil {
		t.Fatal(err)
	}
	testenv.Receive(t, live, 300, 30*time.Second)
	testenv.Eventually(t, 10*time.Second, "all dispatched", func() bool { return o.Count(t, "dispatched_at IS NOT NULL") == 300 })

	// A second exchange for the copies.
	target := testenv.NewBroker(t)
	copies := target.Consume(t, target.Queue(t, "#", nil))
	cfg := testenv.RelayConfig(o, b).WithDefaults()
	cfg.AMQP.Exchange = target.Exchange
	pub := testenv.NewAMQPPublisher(t, cfg.AMQP, 50, zaptest.NewLogger(t))
	defer pub.Close()

	rp, err := ops.NewReplayer(o.Schema, o.Table.Name)
	if err != nil {
		t.Fatal(err)
	}
	var minSeq int64
	if err := o.Pool.QueryRow(ctx, `SELECT min(seq) FROM `+o.Archive()).Scan(&minSeq); err != nil {
		t.Fatal(err)
	}
	sel := ops.ReplaySelection{Types: []string{"quiz.submitted"}, FromSeq: minSeq + 100, ToSeq: minSeq + 299}
	n, err := rp.Count(ctx, o.Pool, sel)
	if err != nil || n != 100 {
		t.Fatalf("dry run counted %d (%v), want 100", n, err)
	}

	// Interrupted after the first batch...
	cctx, cancel := context.WithCancel(ctx)
	p, err := rp.Replay(cctx, o.Pool, pub, sel, ops.ReplayOptions{BatchSize: 30, Progress: func(ops.ReplayProgress) { cancel() }})
	if !errors.Is(err, context.Canceled) || p.Done != 30 {
		t.Fatalf("interrupted replay: done %d, err %v; want 30, canceled", p.Done, err)
	}
	// ...and resumed from the seq after the last confirmed one.
	if p.Resume != p.LastSeq+1 || p.Resent != 0 {
		t.Fatalf("interrupted between sends: resume %d, last seq %d, resent %d", p.Resume, p.LastSeq, p.Resent)
	}
	sel.FromSeq = p.Resume
	p2, err := rp.Replay(ctx, o.Pool, pub, sel, ops.ReplayOptions{BatchSize: 30, Rate: 2000})
	if err != nil || p2.Done != 70 {
		t.Fatalf("resumed replay: done %d, err %v; want 70", p2.Done, err)
	}
	seen := map[string]bool{}
	for _, d := range testenv.Receive(t, copies, 100, 20*time.Second) {
		if d.Type != "quiz.submitted" || d.Headers[ops.HeaderReplay] == nil || seen[d.MessageId] {
			t.Fatalf("copy %s: type %s, replay header %v, seen before %v", d.MessageId, d.Type, d.Headers[ops.HeaderReplay], seen[d.MessageId])
		}
		seen[d.MessageId] = true
	}
	if d, quiet := testenv.Quiet(live, 200*time.Millisecond); !quiet {
		t.Fatalf("replay reached the original exchange: %s", d.MessageId)
	}
}

// dispatched inserts n rows of each given type (cycling through types),
// already dispatched (in the archive, as the relay leaves them), and returns
// their seqs in order.
func dispatched(t *testing.T, o *testenv.Outbox, n int, types ...string) []int64 {
	t.Helper()
	rows, err := o.Pool.Query(context.Background(), `INSERT INTO `+o.Table.Quoted()+` (event_type, payload, dispatched_at)
SELECT ($2::text[])[1 + (i - 1) % cardinality($2::text[])], '{}', now() FROM generate_series(1, $1::int) i
RETURNING seq`, n, types)
	if err != nil {
		t.Fatal(err)
	}
	seqs, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(seqs)
	o.ArchiveRows(t, "seq = ANY($1)", seqs)
	return seqs
}

func newReplay(t *testing.T, o *testenv.Outbox, b *testenv.Broker) (*ops.Replayer, relay.Publisher) {
	t.Helper()
	cfg := relay.Config{AMQP: relay.AMQPConfig{URL: b.URL, Exchange: b.Exchange}}.WithDefaults()
	*cfg.AMQP.DeclareExchange = false
	pub := testenv.NewAMQPPublisher(t, cfg.AMQP, 500, zaptest.NewLogger(t))
	t.Cleanup(func() { pub.Close() })
	rp, err := ops.NewReplayer(o.Schema, o.Table.Name)
	if err != nil {
		t.Fatal(err)
	}
	return rp, pub
}

// TestReplayRate: --rate holds per message, not per page. 60 events at 40/s
// with a page of 500 must take about 1.5 s, spread out, not go out at once.
func TestReplayRate(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	copies := b.Consume(t, b.Queue(t, "#", nil))
	dispatched(t, o, 60, "a")
	rp, pub := newReplay(t, o, b)

	// When each send was confirmed, and how many events it brought.
	type confirmed struct {
		at   time.Time
		done int64
	}
	var sends []confirmed
	start := time.Now()
	p, err := rp.Replay(context.Background(), o.Pool, pub, ops.ReplaySelection{}, ops.ReplayOptions{
		BatchSize: 500, Rate: 40,
		Progress: func(p ops.ReplayProgress) { sends = append(sends, confirmed{time.Now(), p.Done}) },
	})
	elapsed := time.Since(start)
	if err != nil || p.Done != 60 {
		t.Fatalf("replay: done %d, err %v", p.Done, err)
	}
	testenv.Receive(t, copies, 60, 20*time.Second)
	// Slices of 2 events, each 50 ms apart: the last leaves at 1.45 s at
	// the earliest. A per-page limit sends all 60 at once.
	if elapsed < 1200*time.Millisecond || elapsed > 20*time.Second {
		t.Fatalf("60 events at --rate 40 took %s, want about 1.5 s", elapsed)
	}
	if len(sends) < 20 {
		t.Fatalf("the page went out in %d sends, want it paced in small slices", len(sends))
	}
	// No half second sees more than 20 events plus a slice (and slack for
	// a confirm that arrives late, with the next one right behind it).
	for i, s := range sends {
		before := int64(0)
		for _, e := range sends[:i] {
			if s.at.Sub(e.at) >= 500*time.Millisecond {
				before = e.done
			}
		}
		if s.done-before > 28 {
			t.Fatalf("%d events confirmed within 500ms up to %s: not rate limited", s.done-before, s.at.Sub(start))
		}
	}
}

// TestReplayPartialFailure: when the broker refuses one event of a send,
// the replay stops with the resume point at that event, counts the later
// events of the send that were confirmed (a resume sends them again), and
// a resume from there sends nothing below it again.
func TestReplayPartialFailure(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	// Only type a is routable: the b event is returned (mandatory publish).
	copies := b.Consume(t, b.Queue(t, "a", nil))
	seqs := dispatched(t, o, 5, "a", "a", "b", "a", "a")
	rp, pub := newReplay(t, o, b)
	ctx := context.Background()

	p, err := rp.Replay(ctx, o.Pool, pub, ops.ReplaySelection{}, ops.ReplayOptions{BatchSize: 10})
	if !errors.Is(err, ops.ErrReplayFailed) {
		t.Fatalf("replay over an unroutable event: err %v, want ErrReplayFailed", err)
	}
	if p.Done != 2 || p.LastSeq != seqs[1] || p.Resume != seqs[2] || p.Resent != 2 {
		t.Fatalf("progress %+v; want done 2, last seq %d, resume %d, resent 2", p, seqs[1], seqs[2])
	}
	testenv.Receive(t, copies, 4, 10*time.Second) // the two before and the two after the failure

	// Resuming past the bad event (here: only type a) sends the events
	// from the resume point on, and none below it.
	p, err = rp.Replay(ctx, o.Pool, pub, ops.ReplaySelection{FromSeq: p.Resume, Types: []string{"a"}}, ops.ReplayOptions{})
	if err != nil || p.Done != 2 {
		t.Fatalf("resumed: done %d, err %v", p.Done, err)
	}
	for _, d := range testenv.Receive(t, copies, 2, 10*time.Second) {
		if s := d.Headers[relay.HeaderSeq].(int64); s < seqs[2] {
			t.Errorf("resume re-sent seq %d, below its start %d", s, seqs[2])
		}
	}
}

// TestReplayKeepsRoute: a replayed event goes to the exchange and routing
// key its row names, like the first time; with OneExchange (replay
// --exchange) to the publisher's exchange, keeping its routing key.
func TestReplayKeepsRoute(t *testing.T) {
	t.Parallel()
	o, b, other := testenv.NewOutbox(t), testenv.NewBroker(t), testenv.NewBroker(t)
	routed := other.Consume(t, other.Queue(t, "tenant-7", nil))
	cfg := testenv.RelayConfig(o, b)
	cfg.AMQP.Exchanges = []string{other.Exchange}
	if _, err := o.Pool.Exec(context.Background(), `INSERT INTO `+o.Table.Quoted()+` (event_type, payload, routing_key, exchange, dispatched_at)
		VALUES ('invoice.paid', '{}', 'tenant-7', $1, now())`, other.Exchange); err != nil {
		t.Fatal(err)
	}
	o.ArchiveRows(t, "true")
	pub := testenv.NewAMQPPublisher(t, cfg.WithDefaults().AMQP, 10, zaptest.NewLogger(t))
	defer pub.Close()
	rp, err := ops.NewReplayer(o.Schema, o.Table.Name)
	if err != nil {
		t.Fatal(err)
	}
	if p, err := rp.Replay(context.Background(), o.Pool, pub, ops.ReplaySelection{}, ops.ReplayOptions{}); err != nil || p.Done != 1 {
		t.Fatalf("replay: done %d, %v", p.Done, err)
	}
	d := testenv.Receive(t, routed, 1, 10*time.Second)[0]
	if d.Exchange != other.Exchange || d.RoutingKey != "tenant-7" || d.Headers[ops.HeaderReplay] == nil {
		t.Fatalf("replayed to %s with key %s (replay header %v)", d.Exchange, d.RoutingKey, d.Headers[ops.HeaderReplay])
	}

	// replay --exchange: every copy to that exchange, with its routing key.
	target := testenv.NewBroker(t)
	copies := target.Consume(t, target.Queue(t, "#", nil))
	cfg.AMQP.Exchange = target.Exchange
	one := testenv.NewAMQPPublisher(t, cfg.WithDefaults().AMQP, 10, zaptest.NewLogger(t))
	defer one.Close()
	if p, err := rp.Replay(context.Background(), o.Pool, one, ops.ReplaySelection{}, ops.ReplayOptions{OneExchange: true}); err != nil || p.Done != 1 {
		t.Fatalf("replay to one exchange: done %d, %v", p.Done, err)
	}
	d = testenv.Receive(t, copies, 1, 10*time.Second)[0]
	if d.Exchange != target.Exchange || d.RoutingKey != "tenant-7" {
		t.Fatalf("replayed with OneExchange to %s with key %s, want %s and tenant-7", d.Exchange, d.RoutingKey, target.Exchange)
	}
}

// TestReplayBothTables: a replay sends the archived rows and the rows
// marked dispatched in place in the outbox table (before migration 6, or
// by an older relay), merged in seq order across pages, and skips the
// outbox's pending and dead rows; each page is a merge of the two tables'
// seq indexes, not a sort of the whole history.
func TestReplayBothTables(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	ctx := context.Background()
	copies := b.Consume(t, b.Queue(t, "#", nil))
	// Alternately archived and marked in place, with pending and dead rows
	// between them.
	var want []int64
	for i := range 7 {
		if i%2 == 0 {
			want = append(want, dispatched(t, o, 1, "archived")...)
		} else {
			var seq int64
			if err := o.Pool.QueryRow(ctx, `INSERT INTO `+o.Table.Quoted()+` (event_type, payload, dispatched_at)
				VALUES ('in_place', '{}', now()) RETURNING seq`).Scan(&seq); err != nil {
				t.Fatal(err)
			}
			want = append(want, seq)
		}
		if _, err := o.Pool.Exec(ctx, `INSERT INTO `+o.Table.Quoted()+` (event_type, payload, dead_at)
			VALUES ('pending', '{}', NULL), ('dead', '{}', now())`); err != nil {
			t.Fatal(err)
		}
	}
	rp, pub := newReplay(t, o, b)
	if n, err := rp.Count(ctx, o.Pool, ops.ReplaySelection{}); err != nil || n != 7 {
		t.Fatalf("dry run counted %d (%v), want 7", n, err)
	}
	p, err := rp.Replay(ctx, o.Pool, pub, ops.ReplaySelection{}, ops.ReplayOptions{BatchSize: 2})
	if err != nil || p.Done != 7 {
		t.Fatalf("replay: done %d, %v; want 7", p.Done, err)
	}
	var got []int64
	for _, d := range testenv.Receive(t, copies, 7, 10*time.Second) {
		got = append(got, d.Headers[relay.HeaderSeq].(int64))
	}
	if !slices.Equal(got, want) {
		t.Errorf("replayed seqs %v, want %v", got, want)
	}

	// The plan, over a history of some size in both tables.
	for _, q := range []string{
		`INSERT INTO ` + o.Table.Quoted() + ` (event_type, payload, dispatched_at) SELECT 'bulk', '{}', now() FROM generate_series(1, 20000)`,
		`WITH m AS (DELETE FROM ` + o.Table.Quoted() + ` WHERE event_type = 'bulk' AND seq % 2 = 0 RETURNING ` + outboxsql.Columns + `)
		 INSERT INTO ` + o.Archive() + ` (` + outboxsql.Columns + `) SELECT ` + outboxsql.Columns + ` FROM m`,
		`ANALYZE ` + o.Table.Quoted(), `ANALYZE ` + o.Archive(),
	} {
		if _, err := o.Pool.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	// As planned for the first pages, and once the prepared statement
	// goes generic.
	for _, mode := range []string{"force_custom_plan", "force_generic_plan"} {
		var lines []string
		if err := pgx.BeginFunc(ctx, o.Pool, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, `SELECT set_config('plan_cache_mode', $1, true)`, mode); err != nil {
				return err
			}
			rows, err := tx.Query(ctx, `EXPLAIN (COSTS off) `+rp.ReplayPageSQL(), int64(1), int64(0), nil, nil, []string{}, 500)
			if err != nil {
				return err
			}
			lines, err = pgx.CollectRows(rows, pgx.RowTo[string])
			return err
		}); err != nil {
			t.Fatal(err)
		}
		plan := strings.Join(lines, "\n")
		if !strings.Contains(plan, "Merge Append") || strings.Count(plan, "Index Scan") != 2 || strings.Contains(plan, "->  Sort") {
			t.Errorf("%s: the replay page's plan is not a merge of two index scans:\n%s", mode, plan)
		}
	}
}
