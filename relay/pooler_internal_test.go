package relay

import (
	"cmp"
	"context"
	"os"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"
)

// TestWriteTxSynchronousCommitOff checks that the relay's write transactions
// run with synchronous_commit off while the session keeps the server's
// setting: SET LOCAL, never a startup parameter or a session SET, which a
// pooler would carry over to other clients.
func TestWriteTxSynchronousCommitOff(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	cfg, err := PoolConfig(PostgresConfig{DSN: cmp.Or(os.Getenv("TEST_DATABASE_URL"), "postgres://postgres@127.0.0.1:5432/test?sslmode=disable")})
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.ConnConfig.RuntimeParams) != 1 || cfg.ConnConfig.RuntimeParams["application_name"] != "outbox-relay" {
		t.Errorf("startup parameters %v, want application_name only", cfg.ConnConfig.RuntimeParams)
	}
	cfg.MaxConns = 1
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	tx, err := pool.BeginTx(ctx, writeTx)
	if err != nil {
		t.Fatal(err)
	}
	var inTx, after string
	if err := tx.QueryRow(ctx, "SHOW synchronous_commit").Scan(&inTx); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if err := pool.QueryRow(ctx, "SHOW synchronous_commit").Scan(&after); err != nil {
		t.Fatal(err)
	}
	if inTx != "off" || after == "off" {
		t.Errorf("synchronous_commit %q in the write transaction, %q after it on the same connection; want off, then the server's setting", inTx, after)
	}
}
