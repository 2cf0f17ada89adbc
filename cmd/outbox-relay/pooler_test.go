package main

import (
	"strings"
	"testing"
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
