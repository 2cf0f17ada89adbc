package relay

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// queryExecModes are the accepted values of postgres.query_exec_mode, named
// as pgx names them in a DSN's default_query_exec_mode.
var queryExecModes = map[string]pgx.QueryExecMode{
	"cache_statement": pgx.QueryExecModeCacheStatement,
	"cache_describe":  pgx.QueryExecModeCacheDescribe,
	"describe_exec":   pgx.QueryExecModeDescribeExec,
	"exec":            pgx.QueryExecModeExec,
	"simple_protocol": pgx.QueryExecModeSimpleProtocol,
}

// defaultQueryExecMode works through a pooler in transaction mode (it never
// names a prepared statement) and costs nothing measurable directly: the
// relay's statements are few and cheap to plan (docs/operations.md).
const defaultQueryExecMode = "cache_describe"

func queryExecModeNames() []string {
	return slices.Sorted(maps.Keys(queryExecModes))
}

// dsnQueryExecMode returns the DSN's default_query_exec_mode, or "".
func dsnQueryExecMode(dsn string) string {
	if !strings.Contains(dsn, "default_query_exec_mode") {
		return "" // spares parsing, which may read a password file
	}
	// pgx removes the parameter once read: look at the raw ones.
	raw, err := pgconn.ParseConfig(dsn)
	if err != nil {
		return ""
	}
	return raw.RuntimeParams["default_query_exec_mode"]
}

// validatePooler refuses the settings that need a database session when a
// pooler in transaction mode hands each transaction to any server
// connection: LISTEN would listen on a connection someone else then uses.
// Ordered mode keeps no session state (its leases are rows of a table).
func (c Config) validatePooler(bad func(string, string, ...any)) {
	if c.Postgres.Pooler != PoolerTransaction {
		return
	}
	if c.Wake.Mode == WakeNotify {
		bad("wake.mode", "notify needs a database session for LISTEN, which postgres.pooler: transaction (PgBouncer in transaction mode) does not keep; use wake.mode: poll, or point postgres.dsn at PostgreSQL itself or a session-mode pool and set postgres.pooler: none")
	}
}

// ErrPoolerNeedsSession is returned for work that needs a database session
// (migrations hold a session advisory lock) when postgres.pooler is
// transaction.
var ErrPoolerNeedsSession = fmt.Errorf("needs a direct or session-pooled connection: postgres.pooler is %s (PgBouncer in transaction mode); set OUTBOX_RELAY_POSTGRES_DSN to PostgreSQL itself (or a session-mode pool) and OUTBOX_RELAY_POSTGRES_POOLER=none for this command", PoolerTransaction)

// checkSession refuses, at start, notify mode through a pooler in
// transaction mode that postgres.pooler does not declare. Undeclared, it
// would not fail: notifications would go astray (the fallback poll hides it).
func (r *Relay) checkSession(ctx context.Context, pool *pgxpool.Pool, connCfg *pgx.ConnConfig) error {
	if r.cfg.Wake.Mode != WakeNotify {
		return nil
	}
	pooled, err := TransactionPooled(ctx, pool, connCfg)
	if err != nil || !pooled {
		return err
	}
	what, fix := "wake.mode: notify (LISTEN)", "use wake.mode: poll, or point postgres.dsn at PostgreSQL itself or a session-mode pool"
	return fmt.Errorf("%s needs a database session of its own: %w (two connections were handed the same server session); %s", what, ErrTransactionPooler, fix)
}

// ErrTransactionPooler is returned by Run when notify mode finds
// a pooler in transaction mode that postgres.pooler does not declare.
var ErrTransactionPooler = errors.New("postgres.dsn leads to a pooler in transaction mode, such as PgBouncer")

// TransactionPooled reports whether the pool's DSN (connCfg) leads to a
// pooler in transaction mode (transactionPooled), looking a few times:
// another client of the pooler (the relay's own stats loop, at start) may
// take the session in between.
func TransactionPooled(ctx context.Context, pool *pgxpool.Pool, connCfg *pgx.ConnConfig) (bool, error) {
	for range 5 {
		pooled, err := transactionPooled(ctx, pool, connCfg)
		if err != nil {
			return false, fmt.Errorf("check for a pooler: %w", err)
		}
		if pooled {
			return true, nil
		}
	}
	return false, nil
}

// transactionPooled reports whether postgres.dsn leads to a pooler that
// hands server sessions to clients per transaction: a connection's server
// session, once its statement is done, is then given to the next
// transaction of another client (PgBouncer reuses the most recent one
// first), whereas PostgreSQL, or a pooler in session mode, never gives two
// open connections the same backend. A pooler that happens to pick another
// session is not detected: postgres.pooler is the way to say so.
func transactionPooled(ctx context.Context, pool *pgxpool.Pool, connCfg *pgx.ConnConfig) (bool, error) {
	c1, err := pool.Acquire(ctx)
	if err != nil {
		return false, err
	}
	defer c1.Release()
	var first, other int32
	if err := c1.QueryRow(ctx, backendPID).Scan(&first); err != nil {
		return false, err
	}
	c2, err := pgx.ConnectConfig(ctx, connCfg)
	if err != nil {
		return false, err
	}
	defer func() { _ = c2.Close(context.WithoutCancel(ctx)) }()
	// Inside a transaction, so that the session is held while it is read.
	tx, err := c2.Begin(ctx)
	if err != nil {
		return false, err
	}
	defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
	if err := tx.QueryRow(ctx, backendPID).Scan(&other); err != nil {
		return false, err
	}
	return first == other, nil
}

// PoolConfig parses postgres.dsn into the configuration of a pgx pool that
// works through a pooler in transaction mode: the query exec mode of
// postgres.query_exec_mode (else the DSN's, else cache_describe), and no
// startup parameter but application_name, which PgBouncer accepts (it
// refuses any other it was not told to ignore). Session settings the relay
// needs are set per transaction instead (beginWrite).
func PoolConfig(c PostgresConfig) (*pgxpool.Config, error) {
	poolCfg, err := pgxpool.ParseConfig(c.DSN)
	if err != nil {
		return nil, fmt.Errorf("postgres.dsn: %s", Redact(err.Error()))
	}
	mode := cmp.Or(c.QueryExecMode, dsnQueryExecMode(c.DSN), defaultQueryExecMode)
	m, ok := queryExecModes[mode]
	if !ok {
		return nil, fmt.Errorf("postgres.query_exec_mode: must be one of %q, got %q", queryExecModeNames(), mode)
	}
	poolCfg.ConnConfig.DefaultQueryExecMode = m
	if c.MaxConns > 0 {
		poolCfg.MaxConns = c.MaxConns
	}
	if poolCfg.ConnConfig.RuntimeParams["application_name"] == "" {
		poolCfg.ConnConfig.RuntimeParams["application_name"] = "outbox-relay"
	}
	return poolCfg, nil
}

// writeTx begins the relay's write transactions (claim and mark, cleaning,
// the commit horizon, lease renewals) with synchronous_commit off, in the
// BEGIN's own round trip: their commits need no WAL flush, since one lost in
// a database crash only makes the relay publish those events again, which
// at-least-once allows, or a lease lapse early, and not waiting for the
// flush keeps the relay off the producers' commit path. SET LOCAL rather
// than a startup parameter, which PgBouncer refuses.
var writeTx = pgx.TxOptions{BeginQuery: beginWrite}
