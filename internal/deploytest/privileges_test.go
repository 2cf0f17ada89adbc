package deploytest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"

	"github.com/outbox-relay/outbox-relay/internal/ops"
	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
)

// The runbook's SQL blocks are marked for this test by an HTML comment on
// the line before the fence: <!-- deploytest:sql NAME -->.
const runbook = "docs/operations.md"

var sqlBlockStart = regexp.MustCompile(`^<!-- deploytest:sql ([a-z_-]+) -->$`)

// sqlBlocks returns the marked SQL blocks of the runbook by name.
func sqlBlocks(t *testing.T) map[string]string {
	t.Helper()
	blocks := map[string]string{}
	lines := strings.Split(read(t, runbook), "\n")
	for i := 0; i < len(lines); i++ {
		m := sqlBlockStart.FindStringSubmatch(strings.TrimSpace(lines[i]))
		if m == nil {
			continue
		}
		j := i + 1
		for j < len(lines) && strings.TrimSpace(lines[j]) == "" {
			j++
		}
		if j >= len(lines) || strings.TrimSpace(lines[j]) != "```sql" {
			t.Fatalf("%s:%d: the marker %q is not followed by a ```sql block", runbook, i+1, m[1])
		}
		var body []string
		for j++; j < len(lines) && strings.TrimSpace(lines[j]) != "```"; j++ {
			body = append(body, lines[j])
		}
		blocks[m[1]] = strings.Join(body, "\n")
		i = j
	}
	for _, want := range []string{"roles", "grants", "retention", "status"} {
		if blocks[want] == "" {
			t.Fatalf("%s: no SQL block marked <!-- deploytest:sql %s -->", runbook, want)
		}
	}
	return blocks
}

var (
	identVar   = regexp.MustCompile(`:"([a-z_]+)"`)
	literalVar = regexp.MustCompile(`:'([a-z_]+)'`)
)

// statements substitutes the psql variables of a block (:"name" an
// identifier, :'name' a literal) and splits it into statements.
func statements(t *testing.T, block string, vars map[string]string) []string {
	t.Helper()
	sub := func(re *regexp.Regexp, quote func(string) string) {
		block = re.ReplaceAllStringFunc(block, func(m string) string {
			name := re.FindStringSubmatch(m)[1]
			v, ok := vars[name]
			if !ok {
				t.Fatalf("%s: unknown variable %s", runbook, m)
			}
			return quote(v)
		})
	}
	sub(identVar, func(v string) string { return pgx.Identifier{v}.Sanitize() })
	sub(literalVar, func(v string) string { return "'" + strings.ReplaceAll(v, "'", "''") + "'" })
	if strings.Contains(block, `:"`) || strings.Contains(block, ":'") {
		t.Fatalf("%s: a placeholder is left after substitution:\n%s", runbook, block)
	}
	var out []string
	var cur strings.Builder
	for _, line := range strings.Split(block, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "--") {
			continue
		}
		cur.WriteString(line + " ")
		if strings.HasSuffix(line, ";") {
			out = append(out, strings.TrimSpace(cur.String()))
			cur.Reset()
		}
	}
	if strings.TrimSpace(cur.String()) != "" {
		t.Fatalf("%s: a statement without a closing semicolon: %s", runbook, cur.String())
	}
	return out
}

// roleDSN is the shared database's DSN with the given login.
func roleDSN(t *testing.T, role, password string) string {
	t.Helper()
	u, err := url.Parse(testenv.DatabaseURL())
	if err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
		t.Fatalf("TEST_DATABASE_URL must be a postgres:// URL for this test, got %q", testenv.DatabaseURL())
	}
	u.User = url.UserPassword(role, password)
	return u.String()
}

func secret(t *testing.T) string {
	t.Helper()
	b := make([]byte, 12)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// denied checks that sql fails for lack of privilege (SQLSTATE 42501) on
// the object named by msg, e.g. "permission denied for table outbox".
func denied(t *testing.T, pool *pgxpool.Pool, who, sql, msg string) {
	t.Helper()
	_, err := pool.Exec(context.Background(), sql)
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "42501" || !strings.Contains(pgErr.Message, msg) {
		t.Errorf("%s: %s: want %q (42501), got %v", who, sql, msg, err)
	}
}

func allowed(t *testing.T, pool *pgxpool.Pool, who, sql string) {
	t.Helper()
	if _, err := pool.Exec(context.Background(), sql); err != nil {
		t.Errorf("%s: %s: %v", who, sql, err)
	}
}

type privilegeCase struct {
	name       string
	ordering   string
	onDispatch string
	// keep is retention.dispatched with the cleaner on; 0 switches
	// retention off (retention.enabled: false).
	keep  time.Duration
	extra []string // SQL blocks applied after roles and grants
}

// TestLeastPrivilege follows docs/operations.md's least-privilege section
// to the letter: it creates the roles and applies the grants of its SQL
// blocks, writes events as the application role and relays them as the
// relay role, and checks that each role is refused what it must not do.
func TestLeastPrivilege(t *testing.T) {
	t.Parallel()
	blocks := sqlBlocks(t)
	for _, c := range []privilegeCase{
		// The acceptance case: a relay that may read, update and remove
		// outbox rows and archive them, and nothing else (no retention).
		{name: "no_retention", ordering: relay.OrderingNone, onDispatch: relay.OnDispatchMark},
		// Ordered mode also reads the sequence (commit horizon) and takes
		// advisory locks (partition leases).
		{name: "ordered", ordering: relay.OrderingPartitionKey, onDispatch: relay.OnDispatchMark},
		// With the retention grant the cleaner removes archived rows.
		{name: "retention_cleaner", ordering: relay.OrderingNone, onDispatch: relay.OnDispatchMark,
			keep: time.Millisecond, extra: []string{"retention"}},
		// The optional status grant lets `outbox-relay status` run as the
		// relay role, retention off: it reads the version table and the
		// archive.
		{name: "status", ordering: relay.OrderingNone, onDispatch: relay.OnDispatchMark,
			extra: []string{"status"}},
		// The grants suffice for delete-on-dispatch too.
		{name: "delete_on_dispatch", ordering: relay.OrderingNone, onDispatch: relay.OnDispatchDelete},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			leastPrivilege(t, blocks, c)
		})
	}
}

func leastPrivilege(t *testing.T, blocks map[string]string, c privilegeCase) {
	ctx := context.Background()
	o := testenv.NewOutbox(t) // a fresh schema with the outbox table, as postgres
	if o.Table.Name != "outbox" {
		t.Fatalf("the runbook's SQL names the table outbox; testenv made %s", o.Table)
	}
	admin := o.Pool
	schemaID := pgx.Identifier{o.Schema}.Sanitize()
	// A hardened database: PUBLIC may not call the table's UUID function, so
	// only the runbook's EXECUTE grant lets the application insert with the
	// default id.
	if _, err := admin.Exec(ctx, "REVOKE EXECUTE ON FUNCTION "+schemaID+".outbox_uuid_v7() FROM PUBLIC"); err != nil {
		t.Fatal(err)
	}

	appRole, relayRole := testenv.Name("lp_app"), testenv.Name("lp_relay")
	appPW, relayPW := secret(t), secret(t)
	vars := map[string]string{
		"schema": o.Schema, "app_role": appRole, "relay_role": relayRole,
		"app_password": appPW, "relay_password": relayPW,
	}
	// Runs after the pools below are closed and before testenv drops the
	// schema: revoke what the roles were granted, then drop them.
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		for _, role := range []string{appRole, relayRole} {
			r := pgx.Identifier{role}.Sanitize()
			for _, sql := range []string{
				"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '" + role + "'",
				"REVOKE ALL ON ALL TABLES IN SCHEMA " + schemaID + " FROM " + r,
				"REVOKE ALL ON ALL SEQUENCES IN SCHEMA " + schemaID + " FROM " + r,
				"REVOKE ALL ON ALL FUNCTIONS IN SCHEMA " + schemaID + " FROM " + r,
				"REVOKE ALL ON SCHEMA " + schemaID + " FROM " + r,
				"DROP OWNED BY " + r,
				"DROP ROLE " + r,
			} {
				if _, err := admin.Exec(ctx, sql); err != nil {
					t.Errorf("cleanup: %s: %v", sql, err)
				}
			}
		}
	})
	for _, name := range append([]string{"roles", "grants"}, c.extra...) {
		for _, sql := range statements(t, blocks[name], vars) {
			if _, err := admin.Exec(ctx, sql); err != nil {
				t.Fatalf("%s block %q: %s: %v", runbook, name, sql, err)
			}
		}
	}
	table, archive := o.Table.Quoted(), o.Archive()
	seq := schemaID + ".outbox_seq_seq"

	// The application role writes events with the outbox helper, and one
	// with plain SQL that takes every default (the id from outbox_uuid_v7).
	appPool, err := pgxpool.New(ctx, roleDSN(t, appRole, appPW))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(appPool.Close)
	w, err := outbox.NewWriter(o.Schema, o.Table.Name)
	if err != nil {
		t.Fatal(err)
	}
	const n = 40
	want := map[string]string{} // message id → partition key
	events := make([]outbox.Event, n)
	for i := range events {
		events[i] = outbox.NewEvent("lp.created", []byte(fmt.Sprintf(`{"i":%d}`, i)))
		events[i].Key = fmt.Sprintf("key-%d", i%4)
		want[events[i].ID.String()] = events[i].Key
	}
	if err := pgx.BeginFunc(ctx, appPool, func(tx pgx.Tx) error { return w.Write(ctx, tx, events...) }); err != nil {
		t.Fatalf("application role: outbox.Write: %v", err)
	}
	var sqlID string
	if err := pgx.BeginFunc(ctx, appPool, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, "INSERT INTO "+table+" (event_type, partition_key, payload) VALUES ('lp.sql', 'key-0', '{}')")
		return err
	}); err != nil {
		t.Fatalf("application role: plain INSERT: %v", err)
	}
	if err := admin.QueryRow(ctx, "SELECT id::text FROM "+table+" WHERE event_type = 'lp.sql'").Scan(&sqlID); err != nil {
		t.Fatal(err)
	}
	want[sqlID] = "key-0"

	const (
		onTable    = "permission denied for table outbox"
		onArchive  = "permission denied for table outbox_dispatched"
		onSequence = "permission denied for sequence outbox_seq_seq"
		notOwner   = "must be owner of table outbox"
	)
	app := "application role " + appRole
	denied(t, appPool, app, "SELECT count(*) FROM "+table, onTable)
	denied(t, appPool, app, "UPDATE "+table+" SET attempts = 0", onTable)
	denied(t, appPool, app, "DELETE FROM "+table, onTable)
	denied(t, appPool, app, "TRUNCATE "+table, onTable)
	denied(t, appPool, app, "SELECT nextval('"+seq+"')", onSequence)
	denied(t, appPool, app, "SELECT count(*) FROM "+archive, onArchive)
	denied(t, appPool, app, "INSERT INTO "+archive+" SELECT * FROM "+archive+" WHERE false", onArchive)

	// The relay role: no inserts into the outbox, no reads or deletes in
	// the archive (unless granted), no DDL. The forged insert names its
	// id, so only the table privilege is at stake.
	relayPool, err := pgxpool.New(ctx, roleDSN(t, relayRole, relayPW))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(relayPool.Close)
	rel := "relay role " + relayRole
	denied(t, relayPool, rel, "INSERT INTO "+table+" (id, event_type, payload) VALUES (gen_random_uuid(), 'lp.forged', '{}')", onTable)
	denied(t, relayPool, rel, "TRUNCATE "+table, onTable)
	denied(t, relayPool, rel, "ALTER TABLE "+table+" DISABLE TRIGGER outbox_notify", notOwner)
	denied(t, relayPool, rel, "SELECT nextval('"+seq+"')", onSequence)
	denied(t, relayPool, rel, "TRUNCATE "+archive, onArchive)
	if contains(c.extra, "retention") {
		allowed(t, relayPool, rel, "DELETE FROM "+archive+" WHERE dispatched_at < now()")
	} else {
		denied(t, relayPool, rel, "DELETE FROM "+archive+" WHERE dispatched_at < now()", onArchive)
	}
	if !contains(c.extra, "retention") && !contains(c.extra, "status") {
		denied(t, relayPool, rel, "SELECT count(*) FROM "+archive, onArchive)
	}

	// Run the relay in-process as the relay role.
	b := testenv.NewBroker(t)
	q := b.Queue(t, "#", nil)
	deliveries := b.Consume(t, q)
	obsCore, logs := observer.New(zapcore.DebugLevel)
	log := zap.New(zapcore.NewTee(zaptest.NewLogger(t).Core(), obsCore))
	retention := c.keep > 0
	cfg := relay.Config{
		Postgres: relay.PostgresConfig{DSN: roleDSN(t, relayRole, relayPW), Schema: o.Schema, Table: o.Table.Name, MaxConns: 2},
		AMQP:     relay.AMQPConfig{URL: b.URL, Exchange: b.Exchange},
		Relay: relay.EngineConfig{
			Ordering: c.ordering, OnDispatch: c.onDispatch,
			ShutdownTimeout: 5 * time.Second, StatsInterval: 50 * time.Millisecond,
		},
		Wake:      relay.WakeConfig{PollInterval: 20 * time.Millisecond},
		Retention: relay.RetentionConfig{Enabled: &retention, Dispatched: c.keep, Interval: 50 * time.Millisecond},
	}
	r := testenv.StartRelay(t, cfg, testenv.WithLogger(log))
	stop := r.Stop
	stopRelay := func() {
		if err := stop(); err != nil {
			t.Errorf("relay as %s: Run: %v", relayRole, err)
		}
	}

	// Every event arrives, once the duplicates a redelivery could add are
	// dropped, and in ordered mode each key's events come in seq order.
	got := map[string]bool{}
	lastSeq := map[string]int64{}
	deadline := time.After(30 * time.Second)
	for len(got) < len(want) {
		select {
		case d := <-deliveries:
			key, ok := want[d.MessageId]
			if !ok {
				t.Fatalf("unexpected message %q (%s)", d.MessageId, d.RoutingKey)
			}
			if got[d.MessageId] {
				continue
			}
			got[d.MessageId] = true
			s, err := strconv.ParseInt(fmt.Sprint(d.Headers[relay.HeaderSeq]), 10, 64)
			if err != nil {
				t.Fatalf("message %s: header %s: %v", d.MessageId, relay.HeaderSeq, err)
			}
			if c.ordering == relay.OrderingPartitionKey && s <= lastSeq[key] {
				t.Errorf("key %s: seq %d after %d", key, s, lastSeq[key])
			}
			lastSeq[key] = s
		case <-deadline:
			t.Fatalf("relay as %s delivered %d of %d events within 30s; its last errors:\n%s",
				relayRole, len(got), len(want), lastErrors(logs, 5))
		}
	}

	// The rows are archived, deleted at dispatch or removed by the
	// cleaner: only the relay role can have done that.
	cond, what := "dispatched_at IS NULL", "every row marked dispatched"
	if c.onDispatch == relay.OnDispatchDelete || c.keep > 0 {
		cond, what = "true", "every row deleted"
	}
	testenv.Eventually(t, 10*time.Second, what, func() bool { return o.Count(t, cond) == 0 })
	if cond != "true" {
		if d := o.Count(t, "dispatched_at IS NOT NULL AND attempts = 0"); d != len(want) {
			t.Errorf("%d rows dispatched at the first attempt, want %d", d, len(want))
		}
	}
	// Give the statistics loop and the cleaner (every 50ms) a few more
	// turns, whose refusals would show only in the log checked below.
	time.Sleep(200 * time.Millisecond)
	stopRelay()

	if contains(c.extra, "status") {
		relayStatus(t, roleDSN(t, relayRole, relayPW), o, len(want))
	}

	// Nothing the relay did was refused: the claim, mark and retry paths
	// show in the deliveries above, the statistics and cleaner only here.
	for _, e := range logs.All() {
		text := e.Message + " " + fmt.Sprint(e.ContextMap())
		if strings.Contains(text, "permission denied") || strings.Contains(text, "42501") {
			t.Errorf("relay as %s was refused something: %s", relayRole, text)
		}
	}
}

// lastErrors formats the last n log entries that carry an error.
func lastErrors(logs *observer.ObservedLogs, n int) string {
	var lines []string
	for _, e := range logs.All() {
		if errField, ok := e.ContextMap()["error"]; ok {
			lines = append(lines, fmt.Sprintf("  %s: %v", e.Message, errField))
		}
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// relayStatus runs what `outbox-relay status` reads, connected as the
// relay role through dsn, and checks that it counts the dispatched rows.
func relayStatus(t *testing.T, dsn string, o *testenv.Outbox, dispatched int) {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	out, err := ops.New(o.Schema, o.Table.Name)
	if err != nil {
		t.Fatal(err)
	}
	st, err := out.Status(ctx, conn, ops.StatusOptions{KeepDispatched: true, TopTypes: 20})
	if err != nil {
		t.Fatalf("status as the relay role with the status grant: %v", err)
	}
	if d := st.Dispatched; !d.Exact || d.Last5Minutes != int64(dispatched) || st.SchemaVersion == nil {
		t.Errorf("status as the relay role: dispatched %+v, schema version %v; want %d exact and a version", d, st.SchemaVersion, dispatched)
	}
}
