package inbox_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/outbox-relay/outbox-relay/inbox"
	"github.com/outbox-relay/outbox-relay/internal/ident"
	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/schema"
)

func newInboxTable(t *testing.T) (*pgxpool.Pool, string) {
	t.Helper()
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, testenv.DatabaseURL())
	if err != nil {
		t.Fatal(err)
	}
	s := testenv.Name("inbox")
	t.Cleanup(func() {
		_, _ = pool.Exec(context.Background(), "DROP SCHEMA IF EXISTS "+ident.Quote(s)+" CASCADE")
		pool.Close()
	})
	db := stdlib.OpenDBFromPool(pool)
	defer db.Close()
	m, err := schema.NewInboxMigrator(db, s, "inbox")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Up(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Exec(ctx, `CREATE TABLE `+ident.Quote(s)+`.search_index (lesson text PRIMARY KEY, hits int NOT NULL)`); err != nil {
		t.Fatal(err)
	}
	return pool, s
}

// TestDuplicateSkipped: the second delivery of a message id is reported as a
// duplicate, so the consumer's side effect happens once; a rolled-back
// transaction records nothing, so redelivery is processed.
func TestDuplicateSkipped(t *testing.T) {
	t.Parallel()
	pool, s := newInboxTable(t)
	ctx := context.Background()
	in, err := inbox.New(s, "inbox", "search-indexer")
	if err != nil {
		t.Fatal(err)
	}
	other, _ := inbox.New(s, "inbox", "notifier")
	process := func(id string, fail bool) (bool, error) {
		var first bool
		err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
			var err error
			if first, err = in.Claim(ctx, tx, id); err != nil || !first {
				return err
			}
			if _, err := tx.Exec(ctx, `INSERT INTO `+ident.Quote(s)+`.search_index VALUES ('l-1', 1)
				ON CONFLICT (lesson) DO UPDATE SET hits = search_index.hits + 1`); err != nil {
				return err
			}
			if fail {
				return context.Canceled // the consumer crashed mid-way
			}
			return nil
		})
		return first, err
	}
	if _, err := process("m-1", true); err == nil {
		t.Fatal("expected the simulated failure")
	}
	for i, want := range []bool{true, false, false} {
		first, err := process("m-1", false)
		if err != nil {
			t.Fatal(err)
		}
		if first != want {
			t.Fatalf("delivery %d: first = %v, want %v", i+1, first, want)
		}
	}
	var hits int
	if err := pool.QueryRow(ctx, `SELECT hits FROM `+ident.Quote(s)+`.search_index`).Scan(&hits); err != nil {
		t.Fatal(err)
	}
	if hits != 1 {
		t.Fatalf("side effect applied %d times, want once", hits)
	}
	// Another consumer sharing the table processes the same id independently.
	err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		first, err := other.Claim(ctx, tx, "m-1")
		if err == nil && !first {
			t.Error("a different consumer saw m-1 as a duplicate")
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	// database/sql flavour.
	db := stdlib.OpenDBFromPool(pool)
	defer db.Close()
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	first, err := in.ClaimSQL(ctx, tx, "m-1")
	if err != nil || first {
		t.Fatalf("ClaimSQL of a recorded id = %v, %v; want false, nil", first, err)
	}
	_ = tx.Rollback()
	if _, err := in.Claim(ctx, pool, ""); err != inbox.ErrNoMessageID {
		t.Fatalf("empty id: %v", err)
	}
	n, err := in.Purge(ctx, pool, time.Now().Add(time.Minute), 100)
	if err != nil || n != 1 {
		t.Fatalf("purge = %d, %v; want 1 row of this consumer", n, err)
	}
}
