package schema_test

import (
	"context"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/outbox-relay/outbox-relay/internal/ident"
	"github.com/outbox-relay/outbox-relay/internal/outboxsql"
	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/schema"
)

// TestUpDownUp applies every migration, rolls back to zero, and applies them
// again, checking the table and its objects come and go.
func TestUpDownUp(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool, s := schemaPool(t)
	db := stdlib.OpenDBFromPool(pool)
	defer db.Close()
	m, err := schema.NewMigrator(db, s, "events_out")
	if err != nil {
		t.Fatal(err)
	}
	objects := func() int {
		var n int
		err := pool.QueryRow(ctx, `SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
		     WHERE n.nspname = $1 AND c.relkind IN ('r', 'i') AND c.relname NOT LIKE 'events\_out\_schema\_version%')
		  + (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = $1)`, s).Scan(&n)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	for round := 1; round <= 2; round++ {
		res, err := m.Up(ctx)
		if err != nil {
			t.Fatalf("round %d up: %v", round, err)
		}
		if len(res) == 0 {
			t.Fatalf("round %d: nothing applied", round)
		}
		if v, _ := m.Version(ctx); v != m.Latest() {
			t.Fatalf("round %d: version %d, want %d", round, v, m.Latest())
		}
		// table, pkey, id index, pending index, dead index, 2 functions;
		// pending_key index, leases and relays tables with their pkeys, the
		// stats lease table and its pkey; the dispatched archive and its two
		// indexes
		if n := objects(); n != 17 {
			t.Fatalf("round %d: %d objects after up, want 17", round, n)
		}
		var id, ctype, headers string
		err = pool.QueryRow(ctx, `INSERT INTO `+ident.Quote(s)+`.events_out (event_type, payload) VALUES ('lesson.published', '{"a":1}')
			RETURNING id::text, content_type, headers::text`).Scan(&id, &ctype, &headers)
		if err != nil {
			t.Fatalf("plain insert: %v", err)
		}
		if id[14] != '7' || ctype != "application/json" || headers != "{}" {
			t.Fatalf("defaults: id %s (want version 7), content type %q, headers %s", id, ctype, headers)
		}
		if _, err := m.DownTo(ctx, 0); err != nil {
			t.Fatalf("round %d down: %v", round, err)
		}
		if n := objects(); n != 0 {
			t.Fatalf("round %d: %d objects left after down to 0", round, n)
		}
	}
}

func TestRenderQuotesIdentifiers(t *testing.T) {
	t.Parallel()
	fsys, err := schema.Render(ident.Table{Schema: "app", Name: "outbox"})
	if err != nil {
		t.Fatal(err)
	}
	data, err := fsysRead(fsys)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`CREATE TABLE "app"."outbox"`, `"app"."outbox_uuid_v7"()`, `pg_notify('app.outbox', '')`} {
		if !strings.Contains(data, want) {
			t.Errorf("rendered migration lacks %s", want)
		}
	}
	if strings.Contains(data, "{{") {
		t.Error("unrendered template action left")
	}
}

func TestRejectsBadIdentifiers(t *testing.T) {
	t.Parallel()
	for _, bad := range [][2]string{{"public", "out-box"}, {"Public", "outbox"}, {"public", ""}, {"x;drop", "outbox"}, {"public", strings.Repeat("a", 49)}} {
		if _, err := schema.NewMigrator(nil, bad[0], bad[1]); err == nil {
			t.Errorf("%q.%q accepted", bad[0], bad[1])
		}
	}
}

// schemaPool returns a pool on the shared database and a fresh schema name;
// the schema is dropped, then the pool closed, when the test ends.
func schemaPool(t *testing.T) (*pgxpool.Pool, string) {
	t.Helper()
	pool, err := pgxpool.New(context.Background(), testenv.DatabaseURL())
	if err != nil {
		t.Fatal(err)
	}
	s := testenv.Name("mig")
	t.Cleanup(func() {
		_, _ = pool.Exec(context.Background(), "DROP SCHEMA IF EXISTS "+ident.Quote(s)+" CASCADE")
		pool.Close()
	})
	return pool, s
}

// migrated is schemaPool with an outbox table named outbox migrated up in
// the schema, and its migrator.
func migrated(t *testing.T) (*pgxpool.Pool, string, *schema.Migrator) {
	t.Helper()
	pool, s := schemaPool(t)
	db := stdlib.OpenDBFromPool(pool)
	t.Cleanup(func() { _ = db.Close() })
	m, err := schema.NewMigrator(db, s, "outbox")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Up(context.Background()); err != nil {
		t.Fatal(err)
	}
	return pool, s, m
}

// TestConcurrentUp: relays starting together with migrate.auto migrate one
// at a time; none fails and the table is created once.
func TestConcurrentUp(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool, s := schemaPool(t)
	errs := make(chan error, 4)
	for range 4 {
		go func() {
			db := stdlib.OpenDBFromPool(pool)
			defer db.Close()
			m, err := schema.NewMigrator(db, s, "outbox")
			if err == nil {
				_, err = m.Up(ctx)
			}
			errs <- err
		}()
	}
	for range 4 {
		if err := <-errs; err != nil {
			t.Errorf("concurrent up: %v", err)
		}
	}
}

// TestRoutingColumns: migration 3 adds the nullable routing_key and exchange
// overrides, which plain SQL can set, refuses empty or over-long values, and
// goes away on the way down.
func TestRoutingColumns(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool, s, m := migrated(t)
	tbl := ident.Quote(s) + ".outbox"
	var key, exchange string
	err := pool.QueryRow(ctx, `INSERT INTO `+tbl+` (event_type, payload, routing_key, exchange)
		VALUES ('invoice.paid', '{}', 'tenant-7', 'billing.events') RETURNING routing_key, exchange`).Scan(&key, &exchange)
	if err != nil || key != "tenant-7" || exchange != "billing.events" {
		t.Fatalf("insert with overrides: %q %q %v", key, exchange, err)
	}
	var nulls bool
	err = pool.QueryRow(ctx, `INSERT INTO `+tbl+` (event_type, payload) VALUES ('a', '{}')
		RETURNING routing_key IS NULL AND exchange IS NULL`).Scan(&nulls)
	if err != nil || !nulls {
		t.Fatalf("overrides default to NULL: %v %v", nulls, err)
	}
	for _, bad := range []string{`routing_key) VALUES ('a', '{}', '')`, `exchange) VALUES ('a', '{}', '')`,
		`exchange) VALUES ('a', '{}', repeat('x', 256))`} {
		if _, err := pool.Exec(ctx, `INSERT INTO `+tbl+` (event_type, payload, `+bad); err == nil || !strings.Contains(err.Error(), "check constraint") {
			t.Errorf("%s: %v, want a check violation", bad, err)
		}
	}
	if _, err := m.DownTo(ctx, 2); err != nil {
		t.Fatal(err)
	}
	var cols int
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM information_schema.columns WHERE table_schema = $1
		AND table_name = 'outbox' AND column_name IN ('routing_key', 'exchange')`, s).Scan(&cols); err != nil || cols != 0 {
		t.Fatalf("after down: %d routing columns left (%v)", cols, err)
	}
}

// TestArchiveColumns: the archive of dispatched rows has the outbox table's
// columns, in its order, and both have exactly outboxsql.Columns: the
// relay's move lists them, so a column added to one table and not to the
// other (or to the list) would fail every mark.
func TestArchiveColumns(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool, s, _ := migrated(t)
	want := strings.Join(strings.Fields(outboxsql.Columns), " ")
	for _, table := range []string{"outbox", "outbox_" + outboxsql.ArchiveSuffix} {
		var got string
		if err := pool.QueryRow(ctx, `SELECT string_agg(attname, ', ' ORDER BY attnum) FROM pg_attribute
			WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped`, ident.Quote(s)+"."+table).Scan(&got); err != nil {
			t.Fatal(err)
		}
		if got != want {
			t.Errorf("%s has columns\n  %s\noutboxsql.Columns lists\n  %s", table, got, want)
		}
	}
}

// TestArchiveMigration: migration 6 only creates the archive (empty, with
// a replica identity for logical replication) and leaves every row where
// it is, the ones already dispatched included: it takes no time however
// long the history. On the way down the archived rows come back into the
// outbox table with their own seq.
func TestArchiveMigration(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool, s, m := migrated(t)
	if _, err := m.DownTo(ctx, 5); err != nil {
		t.Fatal(err)
	}
	tbl, archive := ident.Quote(s)+".outbox", ident.Quote(s)+".outbox_"+outboxsql.ArchiveSuffix
	for _, q := range []string{
		`INSERT INTO ` + tbl + ` (event_type, partition_key, payload, headers, correlation_id, attempts, last_error, dispatched_at, routing_key)
		 SELECT 'sent', 'k' || i, '\x01', '{"h":"v"}', 'c', 1, 'nack', now() - i * interval '1 minute', 'rk' FROM generate_series(1, 30) i`,
		`INSERT INTO ` + tbl + ` (event_type, payload) SELECT 'pending', '\x00' FROM generate_series(1, 4)`,
		`INSERT INTO ` + tbl + ` (event_type, payload, dead_at) SELECT 'dead', '\x00', now() FROM generate_series(1, 3)`,
	} {
		if _, err := pool.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	// Every column of every row, as text, by table.
	snapshot := func(from string) string {
		var out string
		if err := pool.QueryRow(ctx, `SELECT coalesce(string_agg(r::text, E'\n' ORDER BY seq), '') FROM (SELECT `+
			outboxsql.Columns+` FROM `+from+`) r`).Scan(&out); err != nil {
			t.Fatal(err)
		}
		return out
	}
	count := func(from, cond string) int {
		var n int
		if err := pool.QueryRow(ctx, `SELECT count(*) FROM `+from+` WHERE `+cond).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	before := snapshot(tbl)

	if _, err := m.Up(ctx); err != nil {
		t.Fatal(err)
	}
	if got := snapshot(tbl); got != before {
		t.Errorf("up: the outbox table changed:\n%s\nwant\n%s", got, before)
	}
	if n := count(archive, "true"); n != 0 {
		t.Errorf("up: %d rows in the archive, want none", n)
	}
	var identity string
	if err := pool.QueryRow(ctx, `SELECT relreplident::text FROM pg_class WHERE oid = $1::regclass`, archive).Scan(&identity); err != nil || identity != "f" {
		t.Errorf("up: the archive's replica identity is %q (%v), want f (full)", identity, err)
	}

	// Rows the relay archives after the migration go back down with the
	// rest: move the dispatched ones as a mark does.
	if _, err := pool.Exec(ctx, `WITH m AS (DELETE FROM `+tbl+` WHERE event_type = 'sent' AND partition_key IN ('k1', 'k7', 'k30')
		RETURNING `+outboxsql.Columns+`) INSERT INTO `+archive+` (`+outboxsql.Columns+`) SELECT `+outboxsql.Columns+` FROM m`); err != nil {
		t.Fatal(err)
	}
	if n, d := count(archive, "true"), count(tbl, "dispatched_at IS NOT NULL"); n != 3 || d != 27 {
		t.Errorf("%d rows archived and %d left dispatched in the outbox table, want 3 and 27", n, d)
	}

	if _, err := m.DownTo(ctx, 5); err != nil {
		t.Fatal(err)
	}
	if got := snapshot(tbl); got != before {
		t.Errorf("down: the outbox table is\n%s\nwant\n%s", got, before)
	}
	// The identity goes on from where it was: no seq is drawn twice.
	var seq, max int64
	if err := pool.QueryRow(ctx, `INSERT INTO `+tbl+` (event_type, payload) VALUES ('after', '\x00') RETURNING seq`).Scan(&seq); err != nil {
		t.Fatal(err)
	}
	if err := pool.QueryRow(ctx, `SELECT max(seq) FROM `+tbl+` WHERE event_type <> 'after'`).Scan(&max); err != nil || seq <= max {
		t.Errorf("down: a new row drew seq %d, at or below the moved rows' %d (%v)", seq, max, err)
	}
}
