package main

import (
	"context"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

// TestMigrateRefusesTransactionPooler checks that migrations, which hold a
// session advisory lock, refuse to run through a pooler in transaction mode
// with exit status 2 and a message giving the fix, for `migrate` and for
// migrate.auto at `run`.
func TestMigrateRefusesTransactionPooler(t *testing.T) {
	t.Parallel()
	env := []string{
		"OUTBOX_RELAY_POSTGRES_DSN=postgres://postgres@127.0.0.1:1/test?sslmode=disable",
		"OUTBOX_RELAY_POSTGRES_POOLER=transaction",
		"OUTBOX_RELAY_AMQP_URL=amqp://guest:guest@127.0.0.1:1/",
		"OUTBOX_RELAY_AMQP_EXCHANGE=events",
		"OUTBOX_RELAY_METRICS_ADDR=off",
	}
	for _, args := range [][]string{
		{"migrate", "up"},
		{"run"},
	} {
		e := env
		if args[0] == "run" {
			e = append(e[:len(e):len(e)], "OUTBOX_RELAY_MIGRATE_AUTO=true")
		}
		code, _, stderr := runCLI(t, e, args...)
		if code != 2 {
			t.Fatalf("%s: exit %d, want 2; stderr:\n%s", args, code, stderr)
		}
		for _, want := range []string{"direct or session-pooled connection", "postgres.pooler is transaction", "OUTBOX_RELAY_POSTGRES_POOLER=none"} {
			if !strings.Contains(stderr, want) {
				t.Errorf("%s: stderr does not say %q:\n%s", args, want, stderr)
			}
		}
	}
}

// TestMigrateRefusesUndeclaredPgBouncer checks that `migrate` pointed at
// PgBouncer in transaction mode without postgres.pooler saying so refuses
// (its lock is a session advisory lock) with exit status 2, the reason and
// the fix, creating nothing.
func TestMigrateRefusesUndeclaredPgBouncer(t *testing.T) {
	t.Parallel()
	pgb := testenv.StartPgBouncer(t, testenv.DatabaseURL())
	schema := testenv.Name("t")
	code, _, stderr := runCLI(t, []string{
		"OUTBOX_RELAY_POSTGRES_DSN=" + pgb.DSN("test"),
		"OUTBOX_RELAY_POSTGRES_SCHEMA=" + schema,
	}, "migrate", "up")
	if code != 2 {
		t.Fatalf("exit %d, want 2; stderr:\n%s", code, stderr)
	}
	for _, want := range []string{"pooler in transaction mode, such as PgBouncer", "session-mode pool"} {
		if !strings.Contains(stderr, want) {
			t.Errorf("stderr does not say %q:\n%s", want, stderr)
		}
	}
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, testenv.DatabaseURL())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var n int
	if err := conn.QueryRow(ctx, `SELECT count(*) FROM pg_namespace WHERE nspname = $1`, schema).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 0 {
		t.Errorf("schema %s was created through the pooler", schema)
	}
}
