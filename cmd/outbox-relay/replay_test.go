package main

import (
	"strings"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

// TestReplayCommand: dry run counts, a replay by type publishes exactly the
// dispatched events of that type with the replay header, and bad selections
// exit 2 naming the flag.
func TestReplayCommand(t *testing.T) {
	t.Parallel()
	o := testenv.NewOutbox(t)
	b := testenv.NewBroker(t)
	copies := b.Consume(t, b.Queue(t, "#", nil))
	rows := insertRows(t, o,
		opsRow{typ: "lesson.published", dispatchedAgo: time.Hour},
		opsRow{typ: "lesson.published", dispatchedAgo: time.Minute},
		opsRow{typ: "quiz.submitted", dispatchedAgo: time.Minute},
		opsRow{typ: "lesson.published"}, // pending: never replayed
	)
	env := opsEnv(o, "OUTBOX_RELAY_AMQP_URL="+b.URL, "OUTBOX_RELAY_AMQP_EXCHANGE="+b.Exchange, "OUTBOX_RELAY_AMQP_DECLARE_EXCHANGE=false")

	code, out, errOut := runCLI(t, env, "replay", "--type", "lesson.published", "--dry-run")
	if code != 0 || !strings.Contains(out, "dry run: 2 dispatched events") {
		t.Fatalf("dry run: exit %d, out %q, err %q", code, out, errOut)
	}
	if _, quiet := testenv.Quiet(copies, 200*time.Millisecond); !quiet {
		t.Fatal("the dry run published something")
	}
	code, out, errOut = runCLI(t, env, "replay", "--type", "lesson.published", "--since", "2h")
	if code != 0 || !strings.Contains(out, "replayed 2 of 2 events") {
		t.Fatalf("replay: exit %d, out %q, err %q", code, out, errOut)
	}
	want := map[string]bool{rows[0].id.String(): true, rows[1].id.String(): true}
	for _, d := range testenv.Receive(t, copies, 2, 10*time.Second) {
		if !want[d.MessageId] || d.Headers["x-outbox-replay"] == nil {
			t.Fatalf("unexpected copy %s (%s), replay header %v", d.MessageId, d.Type, d.Headers["x-outbox-replay"])
		}
		delete(want, d.MessageId)
	}
	if !strings.Contains(errOut, "replay: 2/2 (100.0%)") {
		t.Errorf("no progress line on stderr: %q", errOut)
	}

	for _, bad := range [][]string{
		{"replay"},
		{"replay", "--all", "--type", "x"},
		{"replay", "--since", "yesterday-ish"},
		{"replay", "--from-seq", "5", "--to-seq", "2"},
		{"replay", "--all", "--rate", "-1"},
	} {
		if code, _, errOut := runCLI(t, env, bad...); code != 2 {
			t.Errorf("%q: exit %d, want 2 (%s)", bad, code, errOut)
		}
	}
}
