package relay_test

import (
	"context"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/relay/relaytest"
)

// TestLateCommitFoundDuringDrain: a row whose transaction drew its seq
// before a large backlog's and commits while the relay drains that
// backlog in full claims above it is published during the drain, by the
// next claim from the start (floorRescan), not only once the backlog is
// gone.
func TestLateCommitFoundDuringDrain(t *testing.T) {
	t.Parallel()
	o := testenv.NewOutbox(t)
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
	const backlog = 20000
	for range backlog / 1000 {
		o.WriteEvents(t, "quiz.submitted", 1000)
	}

	fake := relaytest.NewFake()
	declare := false
	cfg := relay.Config{
		Postgres: relay.PostgresConfig{DSN: o.DSN, Schema: o.Schema, Table: o.Table.Name},
		AMQP:     relay.AMQPConfig{URL: "amqp://relaytest.invalid/", Exchange: "relaytest", DeclareExchange: &declare},
		// Small claims: the drain takes thousands of them, seconds.
		Relay: relay.EngineConfig{ShutdownTimeout: 5 * time.Second, BatchSize: 10},
	}
	testenv.StartRelay(t, cfg, testenv.WithPublisher(fake))
	testenv.Eventually(t, 30*time.Second, "the relay draining the backlog", func() bool {
		return o.Count(t, "dispatched_at IS NOT NULL") >= 300
	})
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, time.Minute, "every row dispatched", func() bool {
		return o.Count(t, "dispatched_at IS NOT NULL") == backlog+1
	})

	var lateSeq, lowest int64
	if err := o.Pool.QueryRow(ctx, `SELECT (SELECT seq FROM `+o.Rows()+` r WHERE id = $1), (SELECT min(seq) FROM `+o.Rows()+` r)`,
		late.ID).Scan(&lateSeq, &lowest); err != nil {
		t.Fatal(err)
	}
	if lateSeq != lowest {
		t.Fatalf("the late row has seq %d, not the lowest (%d): the test did not commit it below the claims", lateSeq, lowest)
	}
	sent := fake.Sent()
	at := -1
	for i, m := range sent {
		if m.ID == late.ID {
			at = i
			break
		}
	}
	if at < 0 {
		t.Fatal("the late row was never sent")
	}
	if at > len(sent)*9/10 {
		t.Fatalf("the late row was message %d of %d: it waited for the backlog's end, not for the next claim from the start", at+1, len(sent))
	}
	t.Logf("the late row was message %d of %d", at+1, len(sent))
}

// TestFlooredClaimFindsRowsBelow: a claim above the floor that finds
// nothing claims again from the start in the same call, so rows due below
// the floor go now rather than at the next poll (wake.poll_interval, 10 s
// in notify mode, when nothing is in flight to wake the loop).
func TestFlooredClaimFindsRowsBelow(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	o.WriteEvents(t, "quiz.submitted", 5)
	var top int64
	ctx := context.Background()
	if err := o.Pool.QueryRow(ctx, `SELECT max(seq) FROM `+o.Table.Quoted()).Scan(&top); err != nil {
		t.Fatal(err)
	}
	r := testenv.NewRelay(t, config(o, b)).Relay
	got, err := relay.ClaimAbove(ctx, r, o.Pool, top)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 5 {
		t.Fatalf("a claim above seq %d with the 5 due rows below it took %v, want all 5", top, got)
	}
	got, err = relay.ClaimAbove(ctx, r, o.Pool, top-2)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0] != top-1 || got[1] != top {
		t.Fatalf("a claim above seq %d took %v, want the 2 rows above it only", top-2, got)
	}
}
