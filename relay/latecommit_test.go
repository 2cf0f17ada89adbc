package relay_test

import (
	"context"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
)

// A row whose transaction drew its seq before the backlog's rows and
// commits while the relay drains them, in full claims above it, is still
// published.
func TestLateCommitBelowFloor(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	deliveries := b.Consume(t, b.Queue(t, "#", nil))
	w, err := outbox.NewWriter(o.Schema, o.Table.Name)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	late := outbox.NewEvent("lesson.published", []byte(`{"late":true}`))
	tx, err := o.Pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = tx.Rollback(ctx) }()
	if err := w.Write(ctx, tx, late); err != nil {
		t.Fatal(err)
	}
	var want []map[string]outbox.Event
	for range 4 {
		want = append(want, o.WriteEvents(t, "quiz.submitted", 1000))
	}

	cfg := config(o, b)
	cfg.Relay.BatchSize = 20
	start(t, cfg)
	testenv.Eventually(t, 30*time.Second, "the relay draining the backlog", func() bool {
		return o.Count(t, "dispatched_at IS NOT NULL") >= 200
	})
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	all := map[string]outbox.Event{late.ID.String(): late}
	for _, m := range want {
		for id, ev := range m {
			all[id] = ev
		}
	}
	testenv.ReceiveAll(t, deliveries, all, time.Minute)
	testenv.Eventually(t, 10*time.Second, "every row dispatched", func() bool {
		return o.Count(t, "dispatched_at IS NOT NULL") == len(all)
	})
	var lateSeq, lowest int64
	if err := o.Pool.QueryRow(ctx, `SELECT (SELECT seq FROM `+o.Rows()+` r WHERE id = $1), (SELECT min(seq) FROM `+o.Rows()+` r)`,
		late.ID).Scan(&lateSeq, &lowest); err != nil {
		t.Fatal(err)
	}
	if lateSeq != lowest {
		t.Fatalf("the late row has seq %d, not the lowest (%d): the test did not commit it below the claims", lateSeq, lowest)
	}
}
