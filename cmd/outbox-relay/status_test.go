package main

import (
	"context"
	"encoding/json"
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/schema"
)

// statusFixture inserts:
//
//	type a: 5 pending (3 due, 2 in an hour; the first created an hour ago), 1 dead
//	type b: 2 pending (due)
//	type c: 3 dead
//	type d: 5 dispatched 10 minutes ago, 3 three minutes ago, 4 thirty seconds ago
func statusFixture(t *testing.T) *testenv.Outbox {
	t.Helper()
	o := testenv.NewOutbox(t)
	var rows []opsRow
	add := func(n int, r opsRow) {
		for range n {
			rows = append(rows, r)
		}
	}
	add(1, opsRow{typ: "a", createdAgo: time.Hour})
	add(2, opsRow{typ: "a"})
	add(2, opsRow{typ: "a", availableIn: time.Hour})
	add(1, opsRow{typ: "a", attempts: 10, lastError: "nack", deadAgo: time.Hour})
	add(2, opsRow{typ: "b", key: "k"})
	add(3, opsRow{typ: "c", attempts: 10, lastError: "unroutable", deadAgo: time.Minute})
	add(5, opsRow{typ: "d", dispatchedAgo: 10 * time.Minute})
	add(3, opsRow{typ: "d", dispatchedAgo: 3 * time.Minute})
	add(4, opsRow{typ: "d", dispatchedAgo: 30 * time.Second})
	insertRows(t, o, rows...)
	return o
}

func statusJSON(t *testing.T, env []string, args ...string) statusReport {
	t.Helper()
	code, out, errOut := runCLI(t, env, append([]string{"status", "--json"}, args...)...)
	if code != 0 {
		t.Fatalf("status: exit %d: %s", code, errOut)
	}
	var rep statusReport
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("status --json does not parse: %v\n%s", err, out)
	}
	return rep
}

func TestStatus(t *testing.T) {
	t.Parallel()
	o := statusFixture(t)
	env := opsEnv(o)

	rep := statusJSON(t, env)
	if rep.Table != o.Schema+".outbox" || rep.Pending != 7 || rep.DueNow != 5 || rep.Dead != 4 {
		t.Errorf("table %s, pending %d, due %d, dead %d; want 7, 5, 4", rep.Table, rep.Pending, rep.DueNow, rep.Dead)
	}
	if a := rep.OldestPendingAgeSeconds; a == nil || *a < 3600 || *a > 3600+60 {
		t.Errorf("oldest pending age %v, want about 3600s", a)
	}
	d := rep.Dispatched
	if d.LastMinute != 4 || d.Last5Minutes != 7 || !d.Exact || d.Note != "" {
		t.Errorf("dispatched %+v, want 4 in the last minute, 7 in 5 minutes, exact", d)
	}
	want := []typeCounts{{"a", 5, 1}, {"b", 2, 0}, {"c", 0, 3}}
	if fmt.Sprint(rep.EventTypes) != fmt.Sprint(want) || rep.EventTypesTotal != 3 {
		t.Errorf("event types %v (total %d), want %v", rep.EventTypes, rep.EventTypesTotal, want)
	}
	if rep.SchemaVersion == nil || *rep.SchemaVersion != rep.SchemaLatest || rep.SchemaLatest < 1 {
		t.Errorf("schema version %v, latest %d", rep.SchemaVersion, rep.SchemaLatest)
	}
	if rep.NotifyTrigger != "disabled" {
		t.Errorf("notify trigger %q, want disabled (the migration's default)", rep.NotifyTrigger)
	}

	// The text form shows the same numbers.
	code, out, errOut := runCLI(t, env, "status")
	if code != 0 {
		t.Fatalf("status: exit %d: %s", code, errOut)
	}
	for _, re := range []string{
		`pending:\s+7 \(5 due now\)`, `oldest pending:\s+1h00m`, `dead:\s+4\n`,
		`dispatched:\s+4 in the last minute, 7 in the last 5 minutes\n`,
		fmt.Sprintf(`schema version:\s+%d \(latest\)`, rep.SchemaLatest), `notify trigger:\s+disabled\n`,
		`TYPE\s+PENDING\s+DEAD\n\s+a\s+5\s+1\n\s+b\s+2\s+0\n\s+c\s+0\s+3\n`,
	} {
		if !matches(re, out) {
			t.Errorf("status output does not match %q:\n%s", re, out)
		}
	}

	// --recent-rows, which limited the counts to the newest rows, is still
	// accepted and changes nothing: the counts are exact.
	rep = statusJSON(t, env, "--recent-rows", "5")
	if d := rep.Dispatched; d.LastMinute != 4 || d.Last5Minutes != 7 || !d.Exact || d.Note != "" {
		t.Errorf("dispatched counts with --recent-rows %+v, want 4, 7, exact", d)
	}

	// With on_dispatch: delete nothing is counted, and status says why.
	rep = statusJSON(t, opsEnv(o, "OUTBOX_RELAY_RELAY_ON_DISPATCH=delete"))
	if d := rep.Dispatched; d.LastMinute != 0 || d.Last5Minutes != 0 || d.Exact || !strings.Contains(d.Note, "on_dispatch is delete") {
		t.Errorf("dispatched with on_dispatch delete: %+v", d)
	}

	// The trigger state follows `notify enable`.
	if code, _, errOut := runCLI(t, env, "notify", "enable"); code != 0 {
		t.Fatalf("notify enable: %s", errOut)
	}
	if rep := statusJSON(t, env); rep.NotifyTrigger != "enabled" {
		t.Errorf("notify trigger %q after enable", rep.NotifyTrigger)
	}
}

func TestStatusTopTypes(t *testing.T) {
	t.Parallel()
	o := testenv.NewOutbox(t)
	var rows []opsRow
	for i := range 25 {
		for range i + 1 { // type t24 has the most pending rows
			rows = append(rows, opsRow{typ: fmt.Sprintf("t%02d", i)})
		}
	}
	rows = append(rows, opsRow{typ: "t00", deadAgo: time.Minute})
	insertRows(t, o, rows...)

	rep := statusJSON(t, opsEnv(o))
	if len(rep.EventTypes) != statusTopTypes || rep.EventTypesTotal != 25 {
		t.Fatalf("%d types listed of %d, want %d of 25", len(rep.EventTypes), rep.EventTypesTotal, statusTopTypes)
	}
	if first, last := rep.EventTypes[0], rep.EventTypes[statusTopTypes-1]; first != (typeCounts{"t24", 25, 0}) || last != (typeCounts{"t05", 6, 0}) {
		t.Errorf("first %v, last %v", first, last)
	}
	if rep.Dead != 1 || rep.Pending != 25*26/2 {
		t.Errorf("pending %d, dead %d", rep.Pending, rep.Dead)
	}
	_, out, _ := runCLI(t, opsEnv(o), "status")
	if !strings.Contains(out, "event types (top 20 of 25 by pending):") {
		t.Errorf("status output does not say the list is cut:\n%s", out)
	}
}

// TestStatusOldestIsDue: like the gauge, the oldest age counts due rows
// only; an older row waiting out its retry backoff does not make it.
func TestStatusOldestIsDue(t *testing.T) {
	t.Parallel()
	o := testenv.NewOutbox(t)
	insertRows(t, o,
		opsRow{typ: "a", createdAgo: 2 * time.Hour, availableIn: time.Hour, attempts: 3},
		opsRow{typ: "a", createdAgo: 10 * time.Minute})
	rep := statusJSON(t, opsEnv(o))
	if rep.Pending != 2 || rep.DueNow != 1 {
		t.Errorf("pending %d, due %d; want 2, 1", rep.Pending, rep.DueNow)
	}
	a := rep.OldestPendingAgeSeconds
	if a == nil {
		t.Fatal("no oldest pending age, want about 600s")
	}
	if *a < 600 || *a > 600+60 {
		t.Errorf("oldest pending age %.0fs, want about 600s (the due row's), not the delayed row's 7200s", *a)
	}
}

func TestStatusEmptyAndMissing(t *testing.T) {
	t.Parallel()
	o := testenv.NewOutbox(t)
	rep := statusJSON(t, opsEnv(o))
	if rep.Pending != 0 || rep.Dead != 0 || rep.OldestPendingAgeSeconds != nil || len(rep.EventTypes) != 0 || !rep.Dispatched.Exact {
		t.Errorf("empty table: %+v", rep)
	}
	code, out, _ := runCLI(t, opsEnv(o), "status")
	if code != 0 || !matches(`oldest pending:\s+-\n`, out) || !strings.Contains(out, "event types: none pending or dead") {
		t.Errorf("empty table: exit %d:\n%s", code, out)
	}

	env := []string{"OUTBOX_RELAY_POSTGRES_DSN=" + testenv.DatabaseURL(), "OUTBOX_RELAY_POSTGRES_SCHEMA=" + testenv.Name("none")}
	code, _, stderr := runCLI(t, env, "status")
	if code != exitFailed || !strings.Contains(stderr, "migrate up") {
		t.Errorf("missing table: exit %d, stderr %q", code, stderr)
	}

	for _, args := range [][]string{{"status", "extra"}, {"status", "--bogus"}} {
		if code, _, stderr := runCLI(t, nil, args...); code != exitUsage {
			t.Errorf("%q: exit %d, want 2: %s", args, code, stderr)
		}
	}
}

// TestStatusBeforeArchive: on a table not yet migrated to the archive of
// dispatched rows (migration 6), status still reports the rest and says
// that the dispatched counts need `migrate up`.
func TestStatusBeforeArchive(t *testing.T) {
	t.Parallel()
	o := testenv.NewOutbox(t)
	m, err := schema.NewMigrator(o.DB(t), o.Schema, o.Table.Name)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.DownTo(context.Background(), 5); err != nil {
		t.Fatal(err)
	}
	insertRows(t, o, opsRow{typ: "a"})
	rep := statusJSON(t, opsEnv(o))
	if d := rep.Dispatched; rep.Pending != 1 || d.Exact || !strings.Contains(d.Note, "migrate up") {
		t.Errorf("pending %d, dispatched %+v; want 1 pending and a note to run migrate up", rep.Pending, d)
	}
	if rep.SchemaVersion == nil || *rep.SchemaVersion != 5 {
		t.Errorf("schema version %v, want 5", rep.SchemaVersion)
	}
}

func matches(re, s string) bool { return regexp.MustCompile(re).MatchString(s) }

// TestStatusPartitions: in ordered mode, status shows which replica leases
// which partitions and the keyed backlog of each.
func TestStatusPartitions(t *testing.T) {
	t.Parallel()
	o := testenv.NewOutbox(t)
	b := testenv.NewBroker(t)
	insertRows(t, o,
		opsRow{typ: "a", key: "k1", availableIn: time.Hour}, opsRow{typ: "a", key: "k2", availableIn: time.Hour},
		opsRow{typ: "a", key: "k3", availableIn: time.Hour}, opsRow{typ: "a", availableIn: time.Hour})
	env := opsEnv(o, "OUTBOX_RELAY_RELAY_ORDERING=partition_key", "OUTBOX_RELAY_RELAY_PARTITIONS=8")

	// Before any relay runs, every partition is unowned.
	rep := statusJSON(t, env)
	if rep.Partitions == nil || len(rep.Partitions.Owners) != 0 || len(rep.Partitions.Unowned) != 8 {
		t.Fatalf("partitions before a relay runs: %+v", rep.Partitions)
	}
	total := int64(0)
	for _, n := range rep.Partitions.Pending {
		total += n
	}
	if total != 3 {
		t.Fatalf("keyed pending by partition sums to %d, want 3 (the keyless row is not partitioned)", total)
	}

	declare := false
	testenv.StartRelay(t, relay.Config{
		Postgres: relay.PostgresConfig{DSN: o.DSN, Schema: o.Schema},
		AMQP:     relay.AMQPConfig{URL: b.URL, Exchange: b.Exchange, DeclareExchange: &declare},
		Relay:    relay.EngineConfig{Ordering: relay.OrderingPartitionKey, Partitions: 8},
	})
	testenv.Eventually(t, 10*time.Second, "one replica owning all 8 partitions", func() bool {
		rep = statusJSON(t, env)
		return len(rep.Partitions.Owners) == 1 && len(rep.Partitions.Owners[0].Partitions) == 8
	})
	if o := rep.Partitions.Owners[0]; o.Pending != 3 || len(rep.Partitions.Unowned) != 0 || o.PID == 0 {
		t.Fatalf("owner %+v, unowned %v; want pending 3, nothing unowned", o, rep.Partitions.Unowned)
	}
	code, out, errOut := runCLI(t, env, "status")
	if code != 0 {
		t.Fatalf("status: %s", errOut)
	}
	if !matches(`partitions \(ordering: partition_key, 8 partitions, 1 replicas\):\n\s+OWNER PID.*\n\s+\d+\s+outbox-relay\s+\S+\s+\S+\s+0-7\s+3\n`, out) {
		t.Fatalf("status output lacks the partition table:\n%s", out)
	}
}
