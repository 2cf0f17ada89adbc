package outbox_test

import (
	"context"
	"log"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/outbox-relay/outbox-relay/internal/ident"
	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/schema"
)

// exampleDatabase returns a pool whose search_path is a fresh schema holding
// a migrated outbox table and a lessons table, and a function dropping it.
func exampleDatabase() (*pgxpool.Pool, string, func()) {
	ctx := context.Background()
	name := testenv.Name("ex")
	cfg, err := pgxpool.ParseConfig(testenv.DatabaseURL())
	if err != nil {
		log.Fatal(err)
	}
	cfg.ConnConfig.RuntimeParams["search_path"] = name
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		log.Fatal(err)
	}
	db := stdlib.OpenDBFromPool(pool)
	defer db.Close()
	m, err := schema.NewMigrator(db, name, "outbox")
	if err != nil {
		log.Fatal(err)
	}
	if _, err := m.Up(ctx); err != nil {
		log.Fatal(err)
	}
	if _, err := pool.Exec(ctx, `CREATE TABLE lessons (id text PRIMARY KEY, title text NOT NULL)`); err != nil {
		log.Fatal(err)
	}
	return pool, name, func() {
		_, _ = pool.Exec(context.Background(), "DROP SCHEMA "+ident.Quote(name)+" CASCADE")
		pool.Close()
	}
}
