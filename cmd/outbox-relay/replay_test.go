package main

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/ops"
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

// TestReplayProgressFormat: both forms of the progress line show done of
// total, the rate and the time left; a plain line is printed at most every
// few seconds, and the final state always.
func TestReplayProgressFormat(t *testing.T) {
	t.Parallel()
	p := ops.ReplayProgress{Total: 1000, Done: 250, LastSeq: 777, Elapsed: 10 * time.Second}
	var plain, term bytes.Buffer
	progressLine(&plain, p, false)
	progressLine(&term, p, true)
	const want = "replay: 250/1000 (25.0%) 25 events/s, ETA 30s, last seq 777"
	if plain.String() != want+"\n" {
		t.Errorf("plain progress line %q, want %q", plain.String(), want+"\n")
	}
	if term.String() != "\r\033[K"+want {
		t.Errorf("terminal progress line %q, want it to rewrite the line with %q", term.String(), want)
	}
	plain.Reset()
	plain.Reset()
	progressLine(&plain, ops.ReplayProgress{Total: 10, LastSeq: -1, Elapsed: time.Second}, false)
	if want := "replay: 0/10 (0.0%) 0 events/s, ETA -, last seq -\n"; plain.String() != want {
		t.Errorf("nothing done yet: %q, want %q", plain.String(), want)
	}

	// Plain lines: none in the first seconds, then one per interval however
	// many sends there are, and the final state.
	plain.Reset()
	pr := newProgress(&plain, false)
	send := func(i int64) {
		pr.update(ops.ReplayProgress{Total: 100, Done: i, LastSeq: i, Elapsed: time.Duration(i) * 100 * time.Millisecond})
	}
	send(1)
	pr.last = pr.last.Add(-pr.every) // the interval passed
	for i := int64(2); i < 100; i++ {
		send(i)
	}
	pr.finish(ops.ReplayProgress{Total: 100, Done: 100, LastSeq: 100, Elapsed: 10 * time.Second})
	if want := "replay: 2/100 (2.0%) 10 events/s, ETA 10s, last seq 2\nreplay: 100/100 (100.0%) 10 events/s, ETA -, last seq 100\n"; plain.String() != want {
		t.Errorf("plain progress:\n%s\nwant:\n%s", plain.String(), want)
	}
}

// TestResumeCommand: the printed command carries the whole selection, with
// ages turned into the times they stood for, and survives the shell.
func TestResumeCommand(t *testing.T) {
	t.Parallel()
	since, until := time.Date(2026, 11, 23, 9, 0, 0, 123456789, time.UTC), time.Date(2026, 11, 24, 0, 0, 0, 0, time.UTC)
	sel := ops.ReplaySelection{ToSeq: 900, Since: since, Until: until, Types: []string{"order.created", "it's odd"}}
	got := resumeCommand("conf/relay.yaml", sel, 512, "rebuild x", 40, 100)
	abs, _ := filepath.Abs("conf/relay.yaml")
	want := []string{"outbox-relay", "replay", "--config", abs, "--from-seq", "512", "--to-seq", "900",
		"--since", "2026-11-23T09:00:00.123456789Z", "--until", "2026-11-24T00:00:00Z",
		"--type", "order.created", "--type", "it's odd", "--exchange", "rebuild x", "--rate", "40", "--batch-size", "100"}
	out, err := exec.Command("sh", "-c", `for a in `+got+`; do printf '%s\n' "$a"; done`).Output()
	if err != nil {
		t.Fatalf("sh: %v", err)
	}
	if words := strings.Split(strings.TrimSuffix(string(out), "\n"), "\n"); !slices.Equal(words, want) {
		t.Fatalf("resume command %s\nsplits into %q\nwant %q", got, words, want)
	}
	if s, err := parseWhen("2026-11-23T09:00:00.123456789Z"); err != nil || !s.Equal(since) {
		t.Errorf("--since of the resume command parses to %v (%v), want %v", s, err, since)
	}
	// --all becomes --from-seq alone; defaults are left out.
	if got := resumeCommand("", ops.ReplaySelection{}, 1, "", 0, defaultReplayBatch); got != "outbox-relay replay --from-seq 1" {
		t.Errorf("resume of --all: %s", got)
	}
}

// TestReplayInterruptAndResume runs the command as a process, interrupts it
// with SIGINT while it is rate limited, then runs the resume command it
// printed through the shell: every selected event is published at least
// once, and the resume starts after the last event confirmed before the
// interrupt and sends none of them again.
func TestReplayInterruptAndResume(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	copies := b.Consume(t, b.Queue(t, "#", nil))
	var rows []opsRow
	for i := range 60 {
		rows = append(rows, opsRow{typ: []string{"a", "b"}[i%2], dispatchedAgo: time.Minute})
	}
	rows = append(rows, opsRow{typ: "a"}) // pending: not replayed
	ins := insertRows(t, o, rows...)
	seqOf := map[string]int64{}
	for _, r := range ins[:60] {
		seqOf[r.id.String()] = r.seq
	}
	cfg := writeFile(t, fmt.Sprintf("postgres:\n  dsn: %s\n  schema: %s\namqp:\n  url: %s\n  exchange: %s\n  declare_exchange: false\nmetrics:\n  addr: \"off\"\n",
		o.DSN, o.Schema, b.URL, b.Exchange))

	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := t.TempDir()
	if err := os.Symlink(self, filepath.Join(bin, "outbox-relay")); err != nil {
		t.Fatal(err)
	}
	env := []string{"TEST_OUTBOX_RELAY_MAIN=1", "PATH=" + bin + string(os.PathListSeparator) + os.Getenv("PATH")}

	var stdout, stderr bytes.Buffer
	cmd := exec.Command(self, "replay", "--config", cfg, "--all", "--yes", "--rate", "40")
	cmd.Env, cmd.Stdout, cmd.Stderr = env, &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	first := testenv.Receive(t, copies, 10, 30*time.Second)
	if err := cmd.Process.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	code := waitExit(t, cmd)
	if code != exitFailed || !strings.Contains(stderr.String(), "replay interrupted after ") {
		t.Fatalf("interrupted replay: exit %d\nstdout: %s\nstderr: %s", code, &stdout, &stderr)
	}
	// Everything it confirmed arrived before it exited; drain the rest.
	for {
		d, quiet := testenv.Quiet(copies, 500*time.Millisecond)
		if quiet {
			break
		}
		first = append(first, d)
	}
	var resume string
	for _, line := range strings.Split(stderr.String(), "\n") {
		if strings.HasPrefix(line, "  outbox-relay replay ") {
			resume = strings.TrimSpace(line)
		}
	}
	m := regexp.MustCompile(`--from-seq (\d+)`).FindStringSubmatch(resume)
	if m == nil || strings.Contains(resume, "--all") || !strings.Contains(resume, "--rate 40") {
		t.Fatalf("no usable resume command in:\n%s", &stderr)
	}
	from, _ := strconv.ParseInt(m[1], 10, 64)

	sent := map[string]int{}
	var lastConfirmed int64
	for _, d := range first {
		sent[d.MessageId]++
		lastConfirmed = max(lastConfirmed, seqOf[d.MessageId])
	}
	if len(first) >= 60 || !strings.Contains(stdout.String(), fmt.Sprintf("replayed %d of 60 events", len(first))) {
		t.Fatalf("%d copies before the interrupt; stdout %q", len(first), &stdout)
	}
	if from <= lastConfirmed {
		t.Fatalf("resume --from-seq %d starts at or before seq %d, which was confirmed", from, lastConfirmed)
	}
	for _, r := range ins[:60] {
		if r.seq < from && sent[r.id.String()] == 0 {
			t.Fatalf("seq %d lies before the resume point %d but was never sent", r.seq, from)
		}
	}

	stdout.Reset()
	stderr.Reset()
	rest := 60 - len(first)
	sh := exec.Command("sh", "-c", resume)
	sh.Env, sh.Stdout, sh.Stderr = env, &stdout, &stderr
	if err := sh.Run(); err != nil {
		t.Fatalf("resume command %s: %v\n%s", resume, err, &stderr)
	}
	if want := fmt.Sprintf("replayed %d of %d events", rest, rest); !strings.Contains(stdout.String(), want) {
		t.Fatalf("resume: stdout %q, want %q", &stdout, want)
	}
	for _, d := range testenv.Receive(t, copies, rest, 30*time.Second) {
		if s := seqOf[d.MessageId]; s < from {
			t.Errorf("the resume sent seq %d again, below its start %d", s, from)
		}
		sent[d.MessageId]++
	}
	for _, r := range ins[:60] {
		if sent[r.id.String()] != 1 {
			t.Errorf("seq %d was published %d times, want once", r.seq, sent[r.id.String()])
		}
	}
	if d, quiet := testenv.Quiet(copies, 300*time.Millisecond); !quiet {
		t.Fatalf("unexpected extra copy %s (seq %d)", d.MessageId, seqOf[d.MessageId])
	}
}

// waitExit waits for cmd (at most a minute) and returns its exit code.
func waitExit(t *testing.T, cmd *exec.Cmd) int {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode()
		}
		if err != nil {
			t.Fatal(err)
		}
		return 0
	case <-time.After(time.Minute):
		_ = cmd.Process.Kill()
		<-done
		t.Fatal("the command did not exit within a minute")
		return -1
	}
}

// TestReplayExchangeAndUntil: --exchange sends the copies to another
// exchange only; --until (with --since) bounds created_at; a mistyped
// --exchange is refused and not declared; a replay the broker stops
// refusing midway (its exchange deleted) prints the command that resumes it.
func TestReplayExchangeAndUntil(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	live := b.Consume(t, b.Queue(t, "#", nil))
	other := testenv.NewBroker(t)
	copies := other.Consume(t, other.Queue(t, "#", nil))
	rows := insertRows(t, o,
		opsRow{typ: "a", createdAgo: 3 * time.Hour, dispatchedAgo: time.Minute},
		opsRow{typ: "a", createdAgo: 2 * time.Hour, dispatchedAgo: time.Minute},
		opsRow{typ: "a", createdAgo: 30 * time.Minute, dispatchedAgo: time.Minute},
	)
	env := opsEnv(o, "OUTBOX_RELAY_AMQP_URL="+b.URL, "OUTBOX_RELAY_AMQP_EXCHANGE="+b.Exchange, "OUTBOX_RELAY_AMQP_DECLARE_EXCHANGE=false")

	code, out, errOut := runCLI(t, env, "replay", "--until", "1h", "--exchange", other.Exchange)
	if code != 0 || !strings.Contains(out, fmt.Sprintf("replayed 2 of 2 events to exchange %q", other.Exchange)) {
		t.Fatalf("replay --until --exchange: exit %d, out %q, err %q", code, out, errOut)
	}
	want := map[string]bool{rows[0].id.String(): true, rows[1].id.String(): true}
	for _, d := range testenv.Receive(t, copies, 2, 10*time.Second) {
		if !want[d.MessageId] {
			t.Fatalf("copy %s was created after --until", d.MessageId)
		}
		delete(want, d.MessageId)
	}
	if d, quiet := testenv.Quiet(live, 300*time.Millisecond); !quiet {
		t.Fatalf("a copy reached amqp.exchange instead of --exchange: %s", d.MessageId)
	}

	code, out, errOut = runCLI(t, env, "replay", "--since", "150m", "--until", "1h", "--dry-run")
	if code != 0 || !strings.Contains(out, "dry run: 1 dispatched events") {
		t.Fatalf("dry run --since --until: exit %d, out %q, err %q", code, out, errOut)
	}
	code, _, errOut = runCLI(t, env, "replay", "--until", "not-a-time")
	if code != exitUsage || !strings.Contains(errOut, "--until") {
		t.Errorf("bad --until: exit %d, %s", code, errOut)
	}

	// --exchange names no exchange: refused before anything is sent, and
	// not declared (a typo must not leave a stray durable exchange).
	missing := testenv.Name("missing")
	code, _, errOut = runCLI(t, env, "replay", "--until", "1h", "--exchange", missing)
	if code != exitFailed || !strings.Contains(errOut, fmt.Sprintf("exchange %q not found", missing)) ||
		!strings.Contains(errOut, "NOT_FOUND") || !strings.Contains(errOut, "nothing was sent") {
		t.Fatalf("replay --exchange to a missing exchange: exit %d, stderr:\n%s", code, errOut)
	}
	if err := b.ExchangeExists(missing); err == nil {
		t.Fatalf("replay declared the mistyped exchange %s", missing)
	}

	// The exchange disappears after the first copy (one copy a second):
	// the broker refuses the next, nothing more is confirmed, and the
	// command that resumes from the unconfirmed copy is printed.
	type result struct {
		code   int
		errOut string
	}
	done := make(chan result, 1)
	go func() {
		code, _, errOut := runCLI(t, env, "replay", "--until", "1h", "--exchange", other.Exchange, "--rate", "1")
		done <- result{code, errOut}
	}()
	if d := testenv.Receive(t, copies, 1, 10*time.Second)[0]; d.MessageId != rows[0].id.String() {
		t.Fatalf("first copy is %s, want %s", d.MessageId, rows[0].id)
	}
	if err := other.Channel(t).ExchangeDelete(other.Exchange, false, false); err != nil {
		t.Fatal(err)
	}
	var res result
	select {
	case res = <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("replay still running 30s after its exchange was deleted")
	}
	if res.code != exitFailed || !strings.Contains(res.errOut, "publish not confirmed") || !strings.Contains(res.errOut, "404 NOT_FOUND") ||
		!strings.Contains(res.errOut, fmt.Sprintf("nothing before seq %d is sent again; resume with:\n  outbox-relay replay --from-seq %d --until ", rows[1].seq, rows[1].seq)) ||
		!strings.Contains(res.errOut, "--exchange "+other.Exchange) {
		t.Fatalf("replay whose exchange was deleted: exit %d, stderr:\n%s", res.code, res.errOut)
	}
}
