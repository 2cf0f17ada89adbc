// Package ops holds the operator's queries on an outbox table: status,
// dead events (list, retry, purge), the NOTIFY trigger, partition leases
// and backlogs, and replay. The engine (package relay) never uses them;
// cmd/outbox-relay wraps them with flags, prompts and printing.
package ops

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/outbox-relay/outbox-relay/internal/ident"
)

// DB is what the queries need: a pool, a connection or a transaction.
type DB interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
	Begin(ctx context.Context) (pgx.Tx, error)
}

// Outbox is one outbox table's operator queries, rendered once for it.
type Outbox struct {
	table ident.Table
	q     queries
}

// New validates schema.table and renders its queries; it does no I/O.
func New(schema, table string) (*Outbox, error) {
	t := ident.Table{Schema: schema, Name: table}
	if err := t.Validate(); err != nil {
		return nil, err
	}
	return &Outbox{table: t, q: newQueries(t)}, nil
}

// Table is the table the queries act on.
func (o *Outbox) Table() ident.Table { return o.table }

// Exists reports whether the table exists, so that a command can say to
// migrate instead of failing on its first query.
func (o *Outbox) Exists(ctx context.Context, db DB) (bool, error) {
	var exists bool
	if err := db.QueryRow(ctx, o.q.tableExists, o.table.Quoted()).Scan(&exists); err != nil {
		return false, fmt.Errorf("check outbox table: %w", err)
	}
	return exists, nil
}
