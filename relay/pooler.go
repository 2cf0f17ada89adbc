package relay

import (
	"cmp"
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
// connection: LISTEN would listen on a connection someone else then uses,
// and session advisory locks (partition leases) would stay on it.
func (c Config) validatePooler(bad func(string, string, ...any)) {
	if c.Postgres.Pooler != PoolerTransaction {
		return
	}
	if c.Wake.Mode == WakeNotify {
		bad("wake.mode", "notify needs a database session for LISTEN, which postgres.pooler: transaction (PgBouncer in transaction mode) does not keep; use wake.mode: poll, or point postgres.dsn at PostgreSQL itself or a session-mode pool and set postgres.pooler: none")
	}
	if c.Relay.Ordering == OrderingPartitionKey {
		bad("relay.ordering", "partition_key leases partitions with session advisory locks, which postgres.pooler: transaction (PgBouncer in transaction mode) does not keep; point postgres.dsn at PostgreSQL itself or a session-mode pool and set postgres.pooler: none")
	}
}

// ErrPoolerNeedsSession is returned for work that needs a database session
// (migrations hold a session advisory lock) when postgres.pooler is
// transaction.
var ErrPoolerNeedsSession = fmt.Errorf("needs a direct or session-pooled connection: postgres.pooler is %s (PgBouncer in transaction mode); set OUTBOX_RELAY_POSTGRES_DSN to PostgreSQL itself (or a session-mode pool) and OUTBOX_RELAY_POSTGRES_POOLER=none for this command", PoolerTransaction)

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

// writeTx begins the relay's write transactions (claim and mark) with
// synchronous_commit off, in the BEGIN's own round trip: their commits need
// no WAL flush, since one lost in a database crash only makes the relay
// publish those events again, which at-least-once allows, and not waiting
// for the flush keeps the relay off the producers' commit path. SET LOCAL
// rather than a startup parameter, which PgBouncer refuses.
var writeTx = pgx.TxOptions{BeginQuery: beginWrite}
