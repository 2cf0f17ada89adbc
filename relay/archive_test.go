package relay_test

import (
	"context"
	"errors"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/outbox-relay/outbox-relay/internal/ident"
	"github.com/outbox-relay/outbox-relay/internal/outboxsql"
	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/schema"
)

// TestMarkMovesToArchive: with relay.on_dispatch: mark, a published row
// leaves the outbox table for the archive, every column as it was but
// dispatched_at, set to the time of the mark.
func TestMarkMovesToArchive(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	ctx := context.Background()
	deliveries := b.Consume(t, b.Queue(t, "#", nil))
	w, _ := outbox.NewWriter(o.Schema, o.Table.Name)
	var events []outbox.Event
	for i := range 20 {
		ev := outbox.NewEvent("lesson.published", []byte(`{"i":`+strings.Repeat("1", i+1)+`}`))
		ev.Key, ev.CorrelationID = "course-7", "corr"
		ev.Headers = map[string]string{"tenant": "t1"}
		events = append(events, ev)
	}
	if err := pgx.BeginFunc(ctx, o.Pool, func(tx pgx.Tx) error { return w.Write(ctx, tx, events...) }); err != nil {
		t.Fatal(err)
	}
	// Every column but dispatched_at, row by row.
	kept := strings.Replace(outboxsql.Columns, " dispatched_at,", "", 1)
	snapshot := func(from string) string {
		t.Helper()
		var s string
		if err := o.Pool.QueryRow(ctx, `SELECT coalesce(string_agg(r::text, E'\n' ORDER BY seq), '') FROM (SELECT `+kept+` FROM `+from+`) r`).Scan(&s); err != nil {
			t.Fatal(err)
		}
		return s
	}
	before := snapshot(o.Table.Quoted())
	var begun time.Time
	if err := o.Pool.QueryRow(ctx, `SELECT now()`).Scan(&begun); err != nil {
		t.Fatal(err)
	}

	start(t, config(o, b))
	testenv.Receive(t, deliveries, len(events), 10*time.Second)
	testenv.Eventually(t, 10*time.Second, "every row archived", func() bool {
		return o.Count(t, "dispatched_at IS NOT NULL") == len(events)
	})
	var inOutbox, undated int
	if err := o.Pool.QueryRow(ctx, `SELECT (SELECT count(*) FROM `+o.Table.Quoted()+`),
		(SELECT count(*) FROM `+o.Archive()+` WHERE NOT dispatched_at BETWEEN $1 AND now())`, begun).Scan(&inOutbox, &undated); err != nil {
		t.Fatal(err)
	}
	if inOutbox != 0 || undated != 0 {
		t.Errorf("%d rows left in the outbox table, %d archived rows not dispatched since the relay started; want 0 and 0", inOutbox, undated)
	}
	if got := snapshot(o.Archive()); got != before {
		t.Errorf("archived rows\n%s\nwant the rows as written\n%s", got, before)
	}
}

// TestArchiveRetention: the archive's retention walks the archive by seq
// and deletes the rows dispatched before the cutoff and no other. A run of
// old rows dispatched late (retried after being dead: low seq, recent
// dispatched_at) stays until its own dispatched_at expires, and does not
// stop the walk before the expired rows after it; the walk stops at the
// rows created after the cutoff.
func TestArchiveRetention(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	ctx := context.Background()
	tbl := o.Table.Quoted()
	// n rows of type typ, created at created ago and dispatched at
	// dispatched ago, archived.
	insert := func(typ, created, dispatched string, n int) {
		t.Helper()
		if _, err := o.Pool.Exec(ctx, `INSERT INTO `+tbl+` (event_type, payload, created_at, dispatched_at)
			SELECT $1, '\x00', now() - $2::interval, now() - $3::interval FROM generate_series(1, $4)`, typ, created, dispatched, n); err != nil {
			t.Fatal(err)
		}
		o.ArchiveRows(t, "event_type = $1", typ)
	}
	insert("old", "8 days", "8 days", 300)
	insert("retried", "8 days", "1 hour", 45) // more than a page
	insert("old2", "8 days", "8 days", 50)
	insert("edge", "167 hours", "167 hours", 10) // within the 7 days kept
	insert("recent", "1 minute", "1 minute", 100)
	if _, err := o.Pool.Exec(ctx, `INSERT INTO `+tbl+` (event_type, payload) SELECT 'pending', '\x00' FROM generate_series(1, 3)`); err != nil {
		t.Fatal(err)
	}
	cfg := config(o, b)
	cfg.Retention.Dispatched = 7 * 24 * time.Hour
	cfg.Retention.BatchSize = 40
	r := testenv.NewRelay(t, cfg).Relay
	if n, _ := relay.CleanArchivedOnce(ctx, r, o.Pool); n != 350 {
		t.Errorf("first pass deleted %d rows, want the 350 old ones", n)
	}
	// A page of retried rows, then one with the rest of them and the
	// edge rows, created within the retention: the walk stops there.
	if n, pages := relay.CleanArchivedOnce(ctx, r, o.Pool); n != 0 || pages != 2 {
		t.Errorf("second pass deleted %d rows reading %d pages, want none in 2", n, pages)
	}
	for typ, want := range map[string]int{"old": 0, "old2": 0, "retried": 45, "edge": 10, "recent": 100, "pending": 3} {
		if n := o.Count(t, "event_type = $1", typ); n != want {
			t.Errorf("%s: %d rows left, want %d", typ, n, want)
		}
	}
	// Time passes for the retried rows: their own retention ends.
	if _, err := o.Pool.Exec(ctx, `UPDATE `+o.Archive()+` SET dispatched_at = now() - interval '8 days' WHERE event_type = 'retried'`); err != nil {
		t.Fatal(err)
	}
	if n, _ := relay.CleanArchivedOnce(ctx, r, o.Pool); n != 45 {
		t.Errorf("third pass deleted %d rows, want the 45 retried ones", n)
	}
	for typ, want := range map[string]int{"retried": 0, "edge": 10, "recent": 100, "pending": 3} {
		if n := o.Count(t, "event_type = $1", typ); n != want {
			t.Errorf("%s: %d rows left, want %d", typ, n, want)
		}
	}
}

// TestArchiveRetentionReusedPages: once vacuum has freed the archive's
// pages and recent rows filled them, a pass with nothing to delete reads a
// page or two of the archive, not all of it. (A BRIN index on
// dispatched_at cannot tell: the reused ranges keep the old rows' minimum,
// so every range matches the cutoff and a bitmap scan reads every page.)
func TestArchiveRetentionReusedPages(t *testing.T) {
	t.Parallel()
	// A private server: on the shared one, another test's open snapshot
	// keeps vacuum from freeing the deleted rows, and the pass then reads
	// their pages (it failed so in CI).
	pg := testenv.StartPostgres(t)
	o, b := testenv.NewOutboxAt(t, pg.DSN()), testenv.NewBroker(t)
	ctx := context.Background()
	tbl, archive := o.Table.Quoted(), o.Archive()
	cfg := config(o, b)
	cfg.Retention.Dispatched = 7 * 24 * time.Hour
	cfg.Retention.BatchSize = 40
	r := testenv.NewRelay(t, cfg).Relay

	// Everything runs on one connection, whose statistics are flushed on
	// demand: the blocks a pass reads are then the difference of two
	// readings, with no other backend's late flush in between (autovacuum
	// is off for the archive, and no relay runs).
	oneCfg := cfg
	oneCfg.Postgres.MaxConns = 1
	one := testenv.NewPool(t, oneCfg)
	if _, err := one.Exec(ctx, `ALTER TABLE `+archive+` SET (autovacuum_enabled = false)`); err != nil {
		t.Fatal(err)
	}
	insert := func(typ, ago string, n int) {
		t.Helper()
		if _, err := one.Exec(ctx, `INSERT INTO `+tbl+` (event_type, payload, created_at, dispatched_at)
			SELECT $1, convert_to(repeat('x', 200), 'UTF8'), now() - $2::interval, now() - $2::interval
			FROM generate_series(1, $3)`, typ, ago, n); err != nil {
			t.Fatal(err)
		}
		if _, err := one.Exec(ctx, `WITH m AS (DELETE FROM `+tbl+` WHERE event_type = $1 RETURNING `+outboxsql.Columns+`)
			INSERT INTO `+archive+` (`+outboxsql.Columns+`) SELECT `+outboxsql.Columns+` FROM m ORDER BY dispatched_at`, typ); err != nil {
			t.Fatal(err)
		}
	}
	insert("old", "8 days", 3000)
	if n, _ := relay.CleanArchivedOnce(ctx, r, one); n != 3000 {
		t.Fatalf("first pass deleted %d rows, want the 3000 old ones", n)
	}
	// Vacuum frees the pages (and keeps the table's length: the recent
	// rows land in them), then recent rows fill them.
	if _, err := one.Exec(ctx, `VACUUM (TRUNCATE false) `+archive); err != nil {
		t.Fatal(err)
	}
	insert("recent", "1 minute", 2500)
	var pages int64
	if err := one.QueryRow(ctx, `SELECT pg_relation_size($1::regclass) / current_setting('block_size')::bigint`, archive).Scan(&pages); err != nil {
		t.Fatal(err)
	}
	readBlocks := func() int64 {
		t.Helper()
		var n int64
		if _, err := one.Exec(ctx, `SELECT pg_stat_force_next_flush()`); err != nil {
			t.Fatal(err)
		}
		if err := one.QueryRow(ctx, `SELECT coalesce(heap_blks_read, 0) + coalesce(heap_blks_hit, 0)
			FROM pg_statio_all_tables WHERE relid = $1::regclass`, archive).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	before := readBlocks()
	n, walked := relay.CleanArchivedOnce(ctx, r, one)
	read := readBlocks() - before
	if n != 0 {
		t.Errorf("second pass deleted %d rows, want none", n)
	}
	if read > pages/4 {
		t.Errorf("a pass with nothing to delete read %d heap blocks of the archive's %d (%d pages of rows)", read, pages, walked)
	}
	t.Logf("nothing to delete: %d heap blocks read of %d, %d pages of rows", read, pages, walked)
}

// TestArchiveMissing: a relay against a table without the archive
// (migration 6 not applied) stops at start with ErrSchemaOutdated, saying
// to run the migrations, instead of failing every mark.
func TestArchiveMissing(t *testing.T) {
	t.Parallel()
	err := runAtVersion(t, 5)
	if !errors.Is(err, relay.ErrSchemaOutdated) || !containsAll(err.Error(), "outbox-relay migrate up", "outbox_dispatched") {
		t.Fatalf("Run = %v, want ErrSchemaOutdated naming the archive and `outbox-relay migrate up`", err)
	}
}

// TestPrivilegeMissing: a relay whose role may read and update the outbox
// table but neither delete from it nor insert into the archive stops at
// start with ErrPrivilegeMissing naming both, instead of publishing every
// batch and failing to commit it, again and again.
func TestPrivilegeMissing(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	ctx := context.Background()
	role := restrictedRole(t, o, "lp_mark", "GRANT SELECT, UPDATE ON TABLE "+o.Table.Quoted())
	cfg := config(o, b)
	cfg.Postgres.DSN = asRole(t, o.DSN, role)
	rel := testenv.NewRelay(t, cfg)
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	err := rel.Run(ctx)
	if !errors.Is(err, relay.ErrPrivilegeMissing) || !containsAll(err.Error(), "DELETE on", "INSERT on", "outbox_dispatched") {
		t.Fatalf("Run = %v, want ErrPrivilegeMissing naming DELETE on the table and INSERT on the archive", err)
	}
}

// TestPrivilegeRevokedWhileRunning: when the relay's role loses INSERT on
// the archive while it runs, the first batch whose mark is refused makes
// the relay check its privileges again, and Run stops with
// ErrPrivilegeMissing instead of publishing the batch again and again.
func TestPrivilegeRevokedWhileRunning(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	ctx := context.Background()
	deliveries := b.Consume(t, b.Queue(t, "#", nil))
	role, done := runAsGrantedRole(t, o, b, "lp_revoked")

	o.WriteEvents(t, "before.revoke", 5)
	testenv.Receive(t, deliveries, 5, 10*time.Second)
	testenv.Eventually(t, 10*time.Second, "the first events archived", func() bool {
		return o.Count(t, "dispatched_at IS NOT NULL") == 5
	})
	if _, err := o.Pool.Exec(ctx, "REVOKE INSERT ON TABLE "+o.Archive()+" FROM "+ident.Quote(role)); err != nil {
		t.Fatal(err)
	}
	o.WriteEvents(t, "after.revoke", 5)
	awaitStop(t, done, "INSERT on the archive was revoked", relay.ErrPrivilegeMissing, "INSERT on", "outbox_dispatched")
	if n := o.Count(t, "event_type = 'after.revoke' AND dispatched_at IS NULL"); n != 5 {
		t.Errorf("%d of the 5 events written after the revoke are pending, want all", n)
	}
}

// TestArchiveDroppedWhileRunning: when the archive is dropped (migrate
// down to 5) under a running relay, the first batch whose mark fails makes
// the relay check the schema again, and Run stops with ErrSchemaOutdated
// instead of publishing the batch again and again.
func TestArchiveDroppedWhileRunning(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	ctx := context.Background()
	deliveries := b.Consume(t, b.Queue(t, "#", nil))
	done := runInBackground(t, testenv.NewRelay(t, config(o, b)))

	o.WriteEvents(t, "before.down", 5)
	testenv.Receive(t, deliveries, 5, 10*time.Second)
	db := stdlib.OpenDBFromPool(o.Pool)
	defer db.Close()
	m, err := schema.NewMigrator(db, o.Schema, o.Table.Name)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.DownTo(ctx, 5); err != nil {
		t.Fatal(err)
	}
	o.WriteEvents(t, "after.down", 5)
	awaitStop(t, done, "the archive was dropped", relay.ErrSchemaOutdated)
}

// runInBackground runs rel until it stops or 30 s pass; Run's error
// arrives on the channel.
func runInBackground(t *testing.T, rel *testenv.Relay) <-chan error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	done := make(chan error, 1)
	go func() { done <- rel.Run(ctx) }()
	return done
}

// runAsGrantedRole runs a relay on o and b (runInBackground) as a role of
// its own (named after prefix) with the grants docs/operations.md lists for
// it, and returns the role, for the test to revoke one.
func runAsGrantedRole(t *testing.T, o *testenv.Outbox, b *testenv.Broker, prefix string) (string, <-chan error) {
	t.Helper()
	role := restrictedRole(t, o, prefix,
		"GRANT SELECT, UPDATE, DELETE ON TABLE "+o.Table.Quoted(),
		"GRANT SELECT, INSERT, DELETE ON TABLE "+o.Archive(),
		"GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE "+o.Table.Derived("stats_lease"))
	cfg := config(o, b)
	cfg.Postgres.DSN = asRole(t, o.DSN, role)
	return role, runInBackground(t, testenv.NewRelay(t, cfg))
}

// awaitStop waits up to 20 s for Run, started by runInBackground, to stop
// after what the test changed, and fails unless its error is want and names
// every string of naming.
func awaitStop(t *testing.T, done <-chan error, after string, want error, naming ...string) {
	t.Helper()
	select {
	case err := <-done:
		if !errors.Is(err, want) || !containsAll(err.Error(), naming...) {
			t.Fatalf("Run = %v, want %v naming %q", err, want, naming)
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("Run still running 20s after %s", after)
	}
}

// restrictedRole creates a role named after prefix (dropped at cleanup)
// with USAGE on o's schema and the given grants ("GRANT … ON TABLE t",
// completed with "TO role"), and returns its name.
func restrictedRole(t *testing.T, o *testenv.Outbox, prefix string, grants ...string) string {
	t.Helper()
	role := testenv.Name(prefix)
	r := ident.Quote(role)
	for _, q := range append([]string{"CREATE ROLE " + r + " NOLOGIN", "GRANT USAGE ON SCHEMA " + ident.Quote(o.Schema)}, grants...) {
		if !strings.HasPrefix(q, "CREATE") {
			q += " TO " + r
		}
		if _, err := o.Pool.Exec(context.Background(), q); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		for _, q := range []string{"DROP OWNED BY " + r, "DROP ROLE " + r} {
			if _, err := o.Pool.Exec(context.Background(), q); err != nil {
				t.Errorf("cleanup: %s: %v", q, err)
			}
		}
	})
	return role
}

// asRole is dsn with the session acting as role from its start (the
// test's own login, SET ROLE by a startup option).
func asRole(t *testing.T, dsn, role string) string {
	t.Helper()
	u, err := url.Parse(dsn)
	if err != nil {
		t.Fatal(err)
	}
	q := u.Query()
	q.Set("options", "-c role="+role)
	u.RawQuery = strings.ReplaceAll(q.Encode(), "+", "%20") // pgx reads + as itself
	return u.String()
}

// TestClaimRefusedWhileRunning: when the outbox table is dropped, or the
// relay's role loses UPDATE on it (a claim locks rows FOR UPDATE), under a
// running relay, the first claim refused makes it run its checks again,
// and Run stops naming the cause instead of retrying the claim forever.
func TestClaimRefusedWhileRunning(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		change  func(t *testing.T, o *testenv.Outbox, role string)
		want    error
		naming  string
		pending bool // the events written after the change wait in the table
	}{
		{"table dropped", func(t *testing.T, o *testenv.Outbox, _ string) {
			if _, err := o.Pool.Exec(context.Background(), "DROP TABLE "+o.Table.Quoted()+" CASCADE"); err != nil {
				t.Fatal(err)
			}
		}, relay.ErrTableMissing, "", false},
		{"update revoked", func(t *testing.T, o *testenv.Outbox, role string) {
			if _, err := o.Pool.Exec(context.Background(), "REVOKE UPDATE ON TABLE "+o.Table.Quoted()+" FROM "+ident.Quote(role)); err != nil {
				t.Fatal(err)
			}
			o.WriteEvents(t, "after.revoke", 5)
		}, relay.ErrPrivilegeMissing, "UPDATE on", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
			deliveries := b.Consume(t, b.Queue(t, "#", nil))
			role, done := runAsGrantedRole(t, o, b, "lp_claim")

			o.WriteEvents(t, "before.change", 5)
			testenv.Receive(t, deliveries, 5, 10*time.Second)
			tc.change(t, o, role)
			awaitStop(t, done, "the change ("+tc.name+")", tc.want, tc.naming)
			if tc.pending {
				if n := o.Count(t, "event_type = 'after.revoke' AND dispatched_at IS NULL"); n != 5 {
					t.Errorf("%d of the 5 events written after the change are pending, want all", n)
				}
			}
		})
	}
}
