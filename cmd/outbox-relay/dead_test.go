package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

// opsRow is a row the operations tests insert directly. Zero durations
// leave the column at its default (or NULL for dispatched_at and dead_at);
// a dispatched row goes to the archive.
type opsRow struct {
	typ           string
	key           string // "" for NULL
	payload       string
	createdAgo    time.Duration
	availableIn   time.Duration
	attempts      int
	lastError     string // "" for NULL
	dispatchedAgo time.Duration
	deadAgo       time.Duration
}

type inserted struct {
	seq int64
	id  uuid.UUID
}

func insertRows(t *testing.T, o *testenv.Outbox, rows ...opsRow) []inserted {
	t.Helper()
	nullable := func(d time.Duration) any {
		if d == 0 {
			return nil
		}
		return d
	}
	nullText := func(s string) any {
		if s == "" {
			return nil
		}
		return s
	}
	var out []inserted
	archive := false
	for _, r := range rows {
		archive = archive || r.dispatchedAgo != 0
		payload := r.payload
		if payload == "" {
			payload = "{}"
		}
		var in inserted
		err := o.Pool.QueryRow(context.Background(), `INSERT INTO `+o.Table.Quoted()+`
  (event_type, partition_key, payload, created_at, available_at, attempts, last_error, dispatched_at, dead_at)
VALUES ($1, $2, $3, now() - $4::interval, now() + $5::interval, $6, $7, now() - $8::interval, now() - $9::interval)
RETURNING seq, id`,
			r.typ, nullText(r.key), []byte(payload), r.createdAgo, r.availableIn, r.attempts, nullText(r.lastError),
			nullable(r.dispatchedAgo), nullable(r.deadAgo)).Scan(&in.seq, &in.id)
		if err != nil {
			t.Fatalf("insert %+v: %v", r, err)
		}
		out = append(out, in)
	}
	// Dispatched rows are where the relay puts them: in the archive.
	if archive {
		o.ArchiveRows(t, "dispatched_at IS NOT NULL")
	}
	return out
}

// opsEnv is the environment that points the CLI at o.
func opsEnv(o *testenv.Outbox, extra ...string) []string {
	return append([]string{"OUTBOX_RELAY_POSTGRES_DSN=" + o.DSN, "OUTBOX_RELAY_POSTGRES_SCHEMA=" + o.Schema}, extra...)
}

// runWithStdin is runCLI with the given stdin.
func runWithStdin(t *testing.T, env []string, stdin io.Reader, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code = run(args, env, stdin, &out, &errOut)
	return code, out.String(), errOut.String()
}

// tty is a stdin that looks like a terminal to isTerminal.
type tty struct{ io.Reader }

func (tty) Stat() (os.FileInfo, error) { return ttyInfo{}, nil }

type ttyInfo struct{ os.FileInfo }

func (ttyInfo) Mode() os.FileMode { return os.ModeDevice | os.ModeCharDevice }

// snapshot renders every row's mutable state, to show that a refused
// command changed nothing.
func snapshot(t *testing.T, o *testenv.Outbox) string {
	t.Helper()
	var s string
	err := o.Pool.QueryRow(context.Background(), `SELECT coalesce(string_agg(
  row(seq, attempts, available_at, dispatched_at, dead_at, last_error)::text, E'\n' ORDER BY seq), '')
FROM `+o.Rows()+` o`).Scan(&s)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// rowState is what retry changes in one row.
type rowState struct {
	attempts  int
	dead      bool
	due       bool
	lastError *string
}

func stateOf(t *testing.T, o *testenv.Outbox, id uuid.UUID) rowState {
	t.Helper()
	var s rowState
	err := o.Pool.QueryRow(context.Background(), `SELECT attempts, dead_at IS NOT NULL, available_at <= now(), last_error
FROM `+o.Table.Quoted()+` WHERE id = $1`, id).Scan(&s.attempts, &s.dead, &s.due, &s.lastError)
	if err != nil {
		t.Fatalf("state of %s: %v", id, err)
	}
	return s
}

// deadFixture is three dead rows of three types and ages, plus a pending and
// a dispatched row that no dead command may touch.
type deadFixture struct {
	o                *testenv.Outbox
	env              []string
	old, mid, recent inserted // dead 10 days, 2 hours, 5 minutes ago
	pending, sent    inserted
}

func newDeadFixture(t *testing.T) deadFixture {
	t.Helper()
	o := testenv.NewOutbox(t)
	r := insertRows(t, o,
		opsRow{typ: "order.created", key: "k1", payload: `{"a": 1}`, attempts: 10, lastError: "unroutable: no queue bound", deadAgo: 240 * time.Hour},
		opsRow{typ: "order.paid", payload: "\xde\xad\xbe\xef", attempts: 10,
			lastError: "nack:\tbroker\nrefused " + strings.Repeat("x", 100), deadAgo: 2 * time.Hour},
		opsRow{typ: "user.signup", key: "u7", payload: `{"email":"x@example.com"}`, attempts: 1, lastError: "message too large", deadAgo: 5 * time.Minute},
		opsRow{typ: "order.created", availableIn: time.Hour, attempts: 3, lastError: "timeout"},
		opsRow{typ: "order.created", dispatchedAgo: time.Minute},
	)
	return deadFixture{o: o, env: opsEnv(o), old: r[0], mid: r[1], recent: r[2], pending: r[3], sent: r[4]}
}

// listedIDs returns the ids in table output, in order.
func listedIDs(out string, f deadFixture) []string {
	names := map[string]string{f.old.id.String(): "old", f.mid.id.String(): "mid", f.recent.id.String(): "recent",
		f.pending.id.String(): "pending", f.sent.id.String(): "sent"}
	var got []string
	for _, line := range strings.Split(out, "\n") {
		for _, field := range strings.Fields(line) {
			if n, ok := names[field]; ok {
				got = append(got, n)
			}
		}
	}
	return got
}

func TestDeadList(t *testing.T) {
	t.Parallel()
	f := newDeadFixture(t)

	cases := []struct {
		args   []string
		want   []string
		footer string
	}{
		{nil, []string{"recent", "mid", "old"}, "3 dead events shown (3 dead in total)"},
		{[]string{"--type", "order.paid", "--type", "user.signup"}, []string{"recent", "mid"}, "2 dead events shown (3 dead in total)"},
		{[]string{"--type", "order.created"}, []string{"old"}, "1 dead events shown (3 dead in total)"},
		{[]string{"--older-than", "1d"}, []string{"old"}, "1 dead events shown (3 dead in total)"},
		{[]string{"--newer-than", "3h"}, []string{"recent", "mid"}, "2 dead events shown (3 dead in total)"},
		{[]string{"--older-than", "1h", "--newer-than", "3h"}, []string{"mid"}, "1 dead events shown (3 dead in total)"},
		{[]string{"--limit", "1"}, []string{"recent"}, "1 dead events shown (3 dead in total)"},
		{[]string{"--type", "no.such.type"}, nil, "0 dead events shown (3 dead in total)"},
	}
	for _, tc := range cases {
		code, out, errOut := runCLI(t, f.env, append([]string{"dead", "list"}, tc.args...)...)
		if code != 0 {
			t.Fatalf("%q: exit %d: %s", tc.args, code, errOut)
		}
		if got := listedIDs(out, f); strings.Join(got, ",") != strings.Join(tc.want, ",") {
			t.Errorf("%q: listed %v, want %v\n%s", tc.args, got, tc.want, out)
		}
		if !strings.HasSuffix(out, tc.footer+"\n") {
			t.Errorf("%q: output does not end with %q:\n%s", tc.args, tc.footer, out)
		}
	}

	// Table mode: one line per row, last_error cut short and flattened.
	_, out, _ := runCLI(t, f.env, "dead", "list", "--type", "order.paid")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 3 || !strings.HasPrefix(lines[0], "SEQ") {
		t.Fatalf("want header, one row and footer:\n%s", out)
	}
	if !strings.Contains(lines[1], "nack: broker refused xxx") || !strings.HasSuffix(lines[1], "…") || strings.Contains(lines[1], "\t") {
		t.Errorf("last_error not flattened and truncated: %q", lines[1])
	}

	// JSON: every field, full last_error, no payload unless asked.
	code, out, errOut := runCLI(t, f.env, "dead", "list", "--json")
	if code != 0 {
		t.Fatalf("--json: exit %d: %s", code, errOut)
	}
	var list []map[string]any
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		t.Fatalf("--json output does not parse: %v\n%s", err, out)
	}
	if len(list) != 3 || list[0]["id"] != f.recent.id.String() || list[2]["id"] != f.old.id.String() {
		t.Fatalf("--json rows: %v", list)
	}
	if list[1]["last_error"] != "nack:\tbroker\nrefused "+strings.Repeat("x", 100) || list[1]["partition_key"] != nil {
		t.Errorf("--json row: %v", list[1])
	}
	for _, r := range list {
		if _, ok := r["payload"]; ok {
			t.Errorf("payload listed without --payload: %v", r)
		}
		for _, k := range []string{"seq", "event_type", "attempts", "dead_at", "age_seconds", "headers", "created_at"} {
			if _, ok := r[k]; !ok {
				t.Errorf("--json row lacks %s: %v", k, r)
			}
		}
	}

	// --payload: JSON payloads as JSON, others as exact base64.
	code, out, errOut = runCLI(t, f.env, "dead", "list", "--json", "--payload")
	if code != 0 {
		t.Fatalf("--payload: exit %d: %s", code, errOut)
	}
	var withPayload []struct {
		ID            string          `json:"id"`
		Payload       json.RawMessage `json:"payload"`
		PayloadBase64 []byte          `json:"payload_base64"`
	}
	if err := json.Unmarshal([]byte(out), &withPayload); err != nil {
		t.Fatal(err)
	}
	var compact bytes.Buffer
	if err := json.Compact(&compact, withPayload[2].Payload); err != nil || compact.String() != `{"a":1}` || withPayload[2].PayloadBase64 != nil {
		t.Errorf("JSON payload: %s / %v", withPayload[2].Payload, withPayload[2].PayloadBase64)
	}
	if got := withPayload[1].PayloadBase64; string(got) != "\xde\xad\xbe\xef" || withPayload[1].Payload != nil {
		t.Errorf("binary payload: %x / %s", got, withPayload[1].Payload)
	}

	// An empty selection is an empty JSON array, not null.
	_, out, _ = runCLI(t, f.env, "dead", "list", "--json", "--type", "none")
	if strings.TrimSpace(out) != "[]" {
		t.Errorf("empty --json: %q", out)
	}
}

func TestDeadRetryByID(t *testing.T) {
	t.Parallel()
	f := newDeadFixture(t)
	before := map[string]rowState{"mid": stateOf(t, f.o, f.mid.id), "recent": stateOf(t, f.o, f.recent.id),
		"pending": stateOf(t, f.o, f.pending.id)}
	unknown := uuid.New()

	code, out, errOut := runCLI(t, f.env, "dead", "retry", "--id", f.old.id.String(),
		"--id", f.pending.id.String(), "--id", f.sent.id.String(), "--id", unknown.String())
	if code != exitFailed {
		t.Errorf("exit %d, want 1 since three ids were not retried; stderr: %s", code, errOut)
	}
	if out != "retried 1 dead events\n" {
		t.Errorf("stdout %q", out)
	}
	for _, want := range []string{f.pending.id.String() + ": not dead (pending)", f.sent.id.String() + ": not dead (dispatched)",
		unknown.String() + ": not found"} {
		if !strings.Contains(errOut, want) {
			t.Errorf("stderr lacks %q: %s", want, errOut)
		}
	}
	got := stateOf(t, f.o, f.old.id)
	if got.dead || got.attempts != 0 || !got.due || got.lastError == nil || *got.lastError != "unroutable: no queue bound" {
		t.Errorf("retried row: %+v", got)
	}
	for name, id := range map[string]uuid.UUID{"mid": f.mid.id, "recent": f.recent.id, "pending": f.pending.id} {
		if got := stateOf(t, f.o, id); got.attempts != before[name].attempts || got.dead != before[name].dead || got.due != before[name].due {
			t.Errorf("%s changed: %+v, was %+v", name, got, before[name])
		}
	}

	// All ids retried: exit 0; --id never asks, even without a terminal.
	code, out, errOut = runCLI(t, f.env, "dead", "retry", "--id", f.mid.id.String())
	if code != 0 || out != "retried 1 dead events\n" {
		t.Errorf("exit %d, stdout %q, stderr %q", code, out, errOut)
	}
}

func TestDeadRetryByTypeAndAll(t *testing.T) {
	t.Parallel()
	f := newDeadFixture(t)

	// A mass action without --yes and without a terminal refuses and
	// changes nothing.
	before := snapshot(t, f.o)
	for _, args := range [][]string{{"--all"}, {"--type", "order.paid"}} {
		code, _, errOut := runCLI(t, f.env, append([]string{"dead", "retry"}, args...)...)
		if code == 0 || !strings.Contains(errOut, "--yes") {
			t.Errorf("%q without --yes: exit %d, stderr %q", args, code, errOut)
		}
	}
	if after := snapshot(t, f.o); after != before {
		t.Fatalf("refused retry changed rows:\nbefore %s\nafter  %s", before, after)
	}

	code, out, errOut := runCLI(t, f.env, "dead", "retry", "--type", "order.paid", "--type", "no.such", "--yes")
	if code != 0 || out != "retried 1 dead events\n" {
		t.Fatalf("--type: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	if s := stateOf(t, f.o, f.mid.id); s.dead || s.attempts != 0 || !s.due {
		t.Errorf("order.paid row not retried: %+v", s)
	}
	if !stateOf(t, f.o, f.old.id).dead || !stateOf(t, f.o, f.recent.id).dead {
		t.Error("rows of other types were retried")
	}

	code, out, errOut = runCLI(t, f.env, "dead", "retry", "--all", "--yes")
	if code != 0 || out != "retried 2 dead events\n" {
		t.Fatalf("--all: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	if n := f.o.Count(t, "dead_at IS NOT NULL"); n != 0 {
		t.Errorf("%d rows still dead", n)
	}
	if got := stateOf(t, f.o, f.pending.id); got.attempts != 3 || got.dead || got.due {
		t.Errorf("pending row changed: %+v", got)
	}
	if n := f.o.Count(t, "dispatched_at IS NOT NULL"); n != 1 {
		t.Errorf("%d dispatched rows, want 1", n)
	}
}

func TestDeadRetryAsks(t *testing.T) {
	t.Parallel()
	f := newDeadFixture(t)
	before := snapshot(t, f.o)

	for _, answer := range []string{"n\n", "\n", ""} {
		code, out, errOut := runWithStdin(t, f.env, tty{strings.NewReader(answer)}, "dead", "retry", "--all")
		if code != exitFailed || out != "" || !strings.Contains(errOut, "retry 3 dead events? [y/N]") {
			t.Errorf("answer %q: exit %d, stdout %q, stderr %q", answer, code, out, errOut)
		}
	}
	if after := snapshot(t, f.o); after != before {
		t.Fatalf("declined retry changed rows:\nbefore %s\nafter  %s", before, after)
	}

	code, out, errOut := runWithStdin(t, f.env, tty{strings.NewReader("y\n")}, "dead", "retry", "--type", "user.signup")
	if code != 0 || out != "retried 1 dead events\n" || !strings.Contains(errOut, "retry 1 dead events? [y/N]") {
		t.Fatalf("answer y: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	if stateOf(t, f.o, f.recent.id).dead || !stateOf(t, f.o, f.old.id).dead {
		t.Error("wrong rows retried")
	}

	// Nothing to do: no question.
	code, out, errOut = runWithStdin(t, f.env, tty{strings.NewReader("")}, "dead", "retry", "--type", "user.signup")
	if code != 0 || out != "retried 0 dead events\n" || errOut != "" {
		t.Errorf("nothing to retry: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
}

// TestDeadRetryConfirmedRowsOnly: a row that dies while the operator reads
// the prompt is not retried with the ones counted.
func TestDeadRetryConfirmedRowsOnly(t *testing.T) {
	t.Parallel()
	f := newDeadFixture(t)
	var late inserted
	stdin := tty{readerFunc(func(p []byte) (int, error) {
		late = insertRows(t, f.o, opsRow{typ: "order.paid", attempts: 10, deadAgo: time.Second})[0]
		return copy(p, "yes\n"), io.EOF
	})}
	code, out, errOut := runWithStdin(t, f.env, stdin, "dead", "retry", "--all")
	if code != 0 || out != "retried 3 dead events\n" {
		t.Fatalf("exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	if !stateOf(t, f.o, late.id).dead {
		t.Error("a row that died after the prompt was retried")
	}
}

type readerFunc func([]byte) (int, error)

func (f readerFunc) Read(p []byte) (int, error) { return f(p) }

func TestDeadPurge(t *testing.T) {
	t.Parallel()
	f := newDeadFixture(t)
	// One more old dead row of another type than f.old.
	extra := insertRows(t, f.o, opsRow{typ: "order.created", attempts: 10, deadAgo: 30 * 24 * time.Hour})[0]
	before := snapshot(t, f.o)

	code, _, errOut := runCLI(t, f.env, "dead", "purge", "--older-than", "7d", "--type", "order.created")
	if code == 0 || !strings.Contains(errOut, "--yes") {
		t.Errorf("purge without --yes: exit %d, stderr %q", code, errOut)
	}
	code, _, errOut = runWithStdin(t, f.env, tty{strings.NewReader("no\n")}, "dead", "purge", "--older-than", "7d")
	if code == 0 || !strings.Contains(errOut, "purge 2 dead events? [y/N]") {
		t.Errorf("declined purge: exit %d, stderr %q", code, errOut)
	}
	if after := snapshot(t, f.o); after != before {
		t.Fatalf("refused purge changed rows:\nbefore %s\nafter  %s", before, after)
	}

	code, out, errOut := runCLI(t, f.env, "dead", "purge", "--older-than", "7d", "--type", "order.created", "--yes")
	if code != 0 || out != "purged 2 dead events\n" {
		t.Fatalf("exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	if n := f.o.Count(t, "id = ANY($1)", []uuid.UUID{f.old.id, extra.id}); n != 0 {
		t.Errorf("old order.created rows not purged")
	}
	if n := f.o.Count(t, "true"); n != 4 {
		t.Errorf("%d rows left, want 4 (two younger dead, pending, dispatched)", n)
	}

	// Younger than --older-than: kept, whatever the type.
	code, out, _ = runCLI(t, f.env, "dead", "purge", "--older-than", "1h", "--yes")
	if code != 0 || out != "purged 1 dead events\n" {
		t.Fatalf("exit %d, stdout %q", code, out)
	}
	if n := f.o.Count(t, "dead_at IS NOT NULL"); n != 1 || f.o.Count(t, "id = $1", f.recent.id) != 1 {
		t.Errorf("the 5-minute-old dead row should remain alone: %d dead", n)
	}
}

func TestDeadUsageErrors(t *testing.T) {
	t.Parallel()
	id := uuid.NewString()
	cases := []struct {
		args     []string
		wantFlag string
	}{
		{[]string{"dead"}, "list, retry or purge"},
		{[]string{"dead", "resurrect"}, "resurrect"},
		{[]string{"dead", "retry"}, "--id, --type or --all"},
		{[]string{"dead", "retry", "--yes"}, "--id, --type or --all"},
		{[]string{"dead", "retry", "--id", "not-a-uuid"}, "-id"},
		{[]string{"dead", "retry", "--all", "--type", "x"}, "--all"},
		{[]string{"dead", "retry", "--id", id, "--all"}, "--id"},
		{[]string{"dead", "retry", "--id", id, "extra"}, "extra"},
		{[]string{"dead", "purge"}, "--older-than"},
		{[]string{"dead", "purge", "--yes"}, "--older-than"},
		{[]string{"dead", "purge", "--older-than", "0s", "--yes"}, "-older-than"},
		{[]string{"dead", "purge", "--older-than", "-72h", "--yes"}, "-older-than"},
		{[]string{"dead", "purge", "--older-than", "soon", "--yes"}, "-older-than"},
		{[]string{"dead", "list", "--limit", "0"}, "--limit"},
		{[]string{"dead", "list", "--payload"}, "--payload"},
		{[]string{"dead", "list", "--type", ""}, "-type"},
		{[]string{"dead", "list", "--older-than", "1h", "--newer-than", "30m"}, "--newer-than"},
	}
	for _, tc := range cases {
		code, _, stderr := runCLI(t, nil, tc.args...)
		if code != exitUsage {
			t.Errorf("%q: exit %d, want 2; stderr: %s", tc.args, code, stderr)
		}
		if !strings.Contains(stderr, tc.wantFlag) {
			t.Errorf("%q: stderr does not name %q: %s", tc.args, tc.wantFlag, stderr)
		}
	}
}

func TestDeadMissingTable(t *testing.T) {
	t.Parallel()
	env := []string{"OUTBOX_RELAY_POSTGRES_DSN=" + testenv.DatabaseURL(), "OUTBOX_RELAY_POSTGRES_SCHEMA=" + testenv.Name("none")}
	code, _, stderr := runCLI(t, env, "dead", "list")
	if code != exitFailed || !strings.Contains(stderr, "migrate up") {
		t.Errorf("exit %d, stderr %q", code, stderr)
	}
}

func TestParseAge(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]time.Duration{
		"72h": 72 * time.Hour, "90m": 90 * time.Minute, "1.5h": 90 * time.Minute, "7d": 7 * 24 * time.Hour,
		"1d12h": 36 * time.Hour, "0d1s": time.Second,
	} {
		if got, err := parseAge(in); err != nil || got != want {
			t.Errorf("parseAge(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"", "0", "0s", "0d", "-1h", "7", "d", "7days", "1d-2d", "1d-25h", "x1d", "999999999d"} {
		if got, err := parseAge(in); err == nil {
			t.Errorf("parseAge(%q) = %v, want an error", in, got)
		}
	}
}

func TestFormatAge(t *testing.T) {
	t.Parallel()
	for d, want := range map[time.Duration]string{
		0: "0s", 45 * time.Second: "45s", 192 * time.Second: "3m12s", 5*time.Hour + 3*time.Minute: "5h03m",
		52 * time.Hour: "2d04h", -time.Second: "0s",
	} {
		if got := formatAge(d); got != want {
			t.Errorf("formatAge(%v) = %q, want %q", d, got, want)
		}
	}
}
