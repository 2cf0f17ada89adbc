package faulttest

import (
	"context"
	"fmt"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
)

// blockMarking holds a SHARE lock on the outbox table: the relay can still
// claim (FOR UPDATE takes ROW SHARE) and publish, but its mark, which moves
// the rows to the archive (a DELETE), waits. That pins the relay between the broker's confirm
// and its commit, the worst moment to die. The returned func releases it.
func blockMarking(t *testing.T, o *testenv.Outbox) func() {
	t.Helper()
	ctx := context.Background()
	tx, err := o.Pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "LOCK TABLE "+o.Table.Quoted()+" IN SHARE MODE"); err != nil {
		t.Fatal(err)
	}
	released := false
	release := func() {
		if !released {
			released = true
			_ = tx.Rollback(ctx)
		}
	}
	t.Cleanup(release)
	return release
}

// waitMarkBlocked waits until the relay's mark statement waits on the lock.
func waitMarkBlocked(t *testing.T, o *testenv.Outbox) {
	t.Helper()
	testenv.Eventually(t, 30*time.Second, "relay blocked marking rows", func() bool {
		var n int
		err := o.Pool.QueryRow(context.Background(), `SELECT count(*) FROM pg_stat_activity
			WHERE application_name = $1 AND wait_event_type = 'Lock' AND query LIKE 'WITH d AS (%DELETE FROM%'`, o.Schema).Scan(&n)
		return err == nil && n > 0
	})
}

func writeEvents(t *testing.T, o *testenv.Outbox, n int) map[string]bool {
	t.Helper()
	w, err := outbox.NewWriter(o.Schema, o.Table.Name)
	if err != nil {
		t.Fatal(err)
	}
	ids := map[string]bool{}
	events := make([]outbox.Event, n)
	for i := range events {
		events[i] = outbox.NewEvent("lesson.published", fmt.Appendf(nil, `{"n":%d}`, i))
		events[i].Key = fmt.Sprint("lesson-", i%10)
		ids[events[i].ID.String()] = true
	}
	ctx := context.Background()
	if err := pgx.BeginFunc(ctx, o.Pool, func(tx pgx.Tx) error { return w.Write(ctx, tx, events...) }); err != nil {
		t.Fatal(err)
	}
	return ids
}

// TestKillBetweenPublishAndCommit: a relay SIGKILLed after the broker
// confirmed a batch but before it committed the marks loses nothing; the
// next relay publishes the batch again, and the consumer drops exactly those
// duplicates by message_id.
func TestKillBetweenPublishAndCommit(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	deliveries := b.Consume(t, b.Queue(t, "#", nil))
	const n = 200
	written := writeEvents(t, o, n)
	release := blockMarking(t, o)

	first := startRelay(t, relayEnv(o, b.URL, b.Exchange))
	firstRound := testenv.Receive(t, deliveries, n, 30*time.Second)
	waitMarkBlocked(t, o)
	first.kill(t)
	release()
	testenv.Eventually(t, 10*time.Second, "killed relay's backend gone", func() bool {
		var k int
		_ = o.Pool.QueryRow(context.Background(), `SELECT count(*) FROM pg_stat_activity WHERE application_name = $1`, o.Schema).Scan(&k)
		return k == 0
	})
	if got := o.Count(t, "dispatched_at IS NULL"); got != n {
		t.Fatalf("%d rows pending after the kill, want all %d (confirmed but never committed)", got, n)
	}

	startRelay(t, relayEnv(o, b.URL, b.Exchange))
	secondRound := testenv.Receive(t, deliveries, n, 30*time.Second)
	testenv.Eventually(t, 10*time.Second, "all rows dispatched", func() bool {
		return o.Count(t, "dispatched_at IS NOT NULL") == n
	})

	// The consumer's side: drop duplicates by message_id.
	unique := map[string]bool{}
	dups := 0
	for _, d := range append(firstRound, secondRound...) {
		if !written[d.MessageId] {
			t.Fatalf("message %s was never written", d.MessageId)
		}
		if unique[d.MessageId] {
			dups++
		}
		unique[d.MessageId] = true
	}
	if len(unique) != n || dups != n {
		t.Fatalf("unique %d (want %d), duplicates %d (want %d: the batch in flight)", len(unique), n, dups, n)
	}
	t.Logf("kill between publish and commit: written %d, received %d, unique %d, duplicates %d", n, 2*n, len(unique), dups)
}

// TestSIGTERMDrains: SIGTERM while a batch waits to be marked: the relay
// stops claiming, commits the confirmed batch, and exits 0; nothing is
// published twice afterwards.
func TestSIGTERMDrains(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	deliveries := b.Consume(t, b.Queue(t, "#", nil))
	const n = 100
	writeEvents(t, o, n)
	release := blockMarking(t, o)
	p := startRelay(t, relayEnv(o, b.URL, b.Exchange, "OUTBOX_RELAY_RELAY_SHUTDOWN_TIMEOUT=20s"))
	testenv.Receive(t, deliveries, n, 30*time.Second)
	waitMarkBlocked(t, o)
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.done:
		t.Fatal("relay exited before its batch was committed")
	case <-time.After(200 * time.Millisecond):
	}
	release()
	if code := p.exitCode(t, 30*time.Second); code != 0 {
		t.Fatalf("exit status %d after SIGTERM, want 0", code)
	}
	if got := o.Count(t, "dispatched_at IS NOT NULL"); got != n {
		t.Fatalf("%d of %d rows dispatched after the drain", got, n)
	}
	// A new relay finds nothing to publish again.
	startRelay(t, relayEnv(o, b.URL, b.Exchange))
	if d, quiet := testenv.Quiet(deliveries, time.Second); !quiet {
		t.Fatalf("message %s published again after a clean drain", d.MessageId)
	}
}

// TestSIGTERMIdleExitsPromptly: an idle relay exits 0 soon after SIGTERM.
func TestSIGTERMIdleExitsPromptly(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	p := startRelay(t, relayEnv(o, b.URL, b.Exchange))
	testenv.Eventually(t, 20*time.Second, "relay connected", func() bool {
		var k int
		_ = o.Pool.QueryRow(context.Background(), `SELECT count(*) FROM pg_stat_activity WHERE application_name = $1`, o.Schema).Scan(&k)
		return k > 0
	})
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := p.exitCode(t, 5*time.Second); code != 0 {
		t.Fatalf("exit status %d, want 0\n%s", code, p.out.String())
	}
}
