package relay_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap/zaptest"

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
	start(t, config(o, b))
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
	cfg := config(o, b).WithDefaults()
	cfg.AMQP.Exchange = target.Exchange
	pub := relay.NewAMQPPublisher(cfg.AMQP, 50, zaptest.NewLogger(t))
	defer pub.Close()

	rp, err := relay.NewReplayer(o.Schema, o.Table.Name)
	if err != nil {
		t.Fatal(err)
	}
	var minSeq int64
	if err := o.Pool.QueryRow(ctx, `SELECT min(seq) FROM `+o.Table.Quoted()).Scan(&minSeq); err != nil {
		t.Fatal(err)
	}
	sel := relay.ReplaySelection{Types: []string{"quiz.submitted"}, FromSeq: minSeq + 100, ToSeq: minSeq + 299}
	n, err := rp.Count(ctx, o.Pool, sel)
	if err != nil || n != 100 {
		t.Fatalf("dry run counted %d (%v), want 100", n, err)
	}

	// Interrupted after the first batch...
	cctx, cancel := context.WithCancel(ctx)
	p, err := rp.Replay(cctx, o.Pool, pub, sel, relay.ReplayOptions{BatchSize: 30, Progress: func(relay.ReplayProgress) { cancel() }})
	if !errors.Is(err, context.Canceled) || p.Done != 30 {
		t.Fatalf("interrupted replay: done %d, err %v; want 30, canceled", p.Done, err)
	}
	// ...and resumed from the seq after the last confirmed one.
	sel.FromSeq = p.LastSeq + 1
	p2, err := rp.Replay(ctx, o.Pool, pub, sel, relay.ReplayOptions{BatchSize: 30, Rate: 2000})
	if err != nil || p2.Done != 70 {
		t.Fatalf("resumed replay: done %d, err %v; want 70", p2.Done, err)
	}
	seen := map[string]bool{}
	for _, d := range testenv.Receive(t, copies, 100, 20*time.Second) {
		if d.Type != "quiz.submitted" || d.Headers[relay.HeaderReplay] == nil || seen[d.MessageId] {
			t.Fatalf("copy %s: type %s, replay header %v, seen before %v", d.MessageId, d.Type, d.Headers[relay.HeaderReplay], seen[d.MessageId])
		}
		seen[d.MessageId] = true
	}
	if d, quiet := testenv.Quiet(live, 200*time.Millisecond); !quiet {
		t.Fatalf("replay reached the original exchange: %s", d.MessageId)
	}
}
