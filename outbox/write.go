package outbox

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/outbox-relay/outbox-relay/internal/ident"
)

// Tx is the one method Write needs from a pgx transaction; pgx.Tx satisfies it.
type Tx interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

// SQLTx is the one method WriteSQL needs from a database/sql transaction;
// *sql.Tx satisfies it. The database/sql driver must be pgx's
// (github.com/jackc/pgx/v5/stdlib), which encodes the array parameters.
type SQLTx interface {
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
}

// Writer inserts events into one outbox table. The zero value is not usable;
// use NewWriter, or the package-level Write for public.outbox.
type Writer struct {
	table  ident.Table
	insert string
	// insertRouted also sets routing_key and exchange (00003_routing.sql);
	// used only for batches that set them, so an application that does not
	// can upgrade this package before its table is migrated.
	insertRouted string
}

// defaultWriter backs the package-level Write and WriteSQL: public.outbox.
var defaultWriter = mustWriter("public", "outbox")

func mustWriter(schema, table string) *Writer {
	w, err := NewWriter(schema, table)
	if err != nil {
		panic(err)
	}
	return w
}

// NewWriter returns a Writer for schema.table, which must match the relay's
// postgres.schema and postgres.table settings.
func NewWriter(schema, table string) (*Writer, error) {
	t := ident.Table{Schema: schema, Name: table}
	if err := t.Validate(); err != nil {
		return nil, fmt.Errorf("outbox: %w", err)
	}
	return &Writer{table: t, insert: fmt.Sprintf(insertEvents, t.Quoted()), insertRouted: fmt.Sprintf(insertRoutedEvents, t.Quoted())}, nil
}

// insertEvents inserts any number of events in one statement and one round
// trip: one array parameter per column, unnested in the caller's order so
// sequence numbers follow the slice.
const insertEvents = `INSERT INTO %s
  (id, event_type, partition_key, payload, content_type, headers, correlation_id, available_at)
SELECT u.id::uuid, u.event_type, u.partition_key, u.payload, u.content_type, u.headers::jsonb,
       u.correlation_id, coalesce(u.available_at, now())
FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::text[], $6::text[], $7::text[], $8::timestamptz[])
     WITH ORDINALITY AS u(id, event_type, partition_key, payload, content_type, headers, correlation_id, available_at, ord)
ORDER BY u.ord`

// insertRoutedEvents is insertEvents with the routing overrides.
const insertRoutedEvents = `INSERT INTO %s
  (id, event_type, partition_key, payload, content_type, headers, correlation_id, available_at, routing_key, exchange)
SELECT u.id::uuid, u.event_type, u.partition_key, u.payload, u.content_type, u.headers::jsonb,
       u.correlation_id, coalesce(u.available_at, now()), u.routing_key, u.exchange
FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::text[], $6::text[], $7::text[], $8::timestamptz[],
            $9::text[], $10::text[])
     WITH ORDINALITY AS u(id, event_type, partition_key, payload, content_type, headers, correlation_id, available_at,
                          routing_key, exchange, ord)
ORDER BY u.ord`

// Write inserts events with the caller's pgx transaction in one round trip.
// The events exist only if that transaction commits; Write never begins,
// commits or retries. Invalid events are rejected before anything is sent.
// Events with a zero ID get a new UUIDv7 (the caller's slice is not modified).
func (w *Writer) Write(ctx context.Context, tx Tx, events ...Event) error {
	return w.write(ctx, events, func(stmt string, args []any) error {
		_, err := tx.Exec(ctx, stmt, args...)
		return err
	})
}

// WriteSQL is Write for a database/sql transaction (pgx stdlib driver).
func (w *Writer) WriteSQL(ctx context.Context, tx SQLTx, events ...Event) error {
	return w.write(ctx, events, func(stmt string, args []any) error {
		_, err := tx.ExecContext(ctx, stmt, args...)
		return err
	})
}

// write validates events and runs their insert with exec, the caller's
// transaction's own method.
func (w *Writer) write(ctx context.Context, events []Event, exec func(stmt string, args []any) error) error {
	args, err := w.args(ctx, events)
	if err != nil || args == nil {
		return err
	}
	if err := exec(w.statement(args), args); err != nil {
		return w.insertErr(len(events), args, err)
	}
	return nil
}

// Write inserts events into public.outbox with the caller's pgx transaction.
// See Writer.Write.
func Write(ctx context.Context, tx Tx, events ...Event) error {
	return defaultWriter.Write(ctx, tx, events...)
}

// WriteSQL inserts events into public.outbox with the caller's database/sql
// transaction. See Writer.Write.
func WriteSQL(ctx context.Context, tx SQLTx, events ...Event) error {
	return defaultWriter.WriteSQL(ctx, tx, events...)
}

// insertErr wraps a failed insert of n events; a table without the routing
// columns gets the fix named.
func (w *Writer) insertErr(n int, args []any, err error) error {
	var pgErr *pgconn.PgError
	if len(args) > 8 && errors.As(err, &pgErr) && pgErr.Code == "42703" {
		return fmt.Errorf("outbox: insert %d events into %s: RoutingKey and Exchange need the routing_key and exchange columns (run `outbox-relay migrate up`): %w", n, w.table, err)
	}
	return fmt.Errorf("outbox: insert %d events into %s: %w", n, w.table, err)
}

// statement returns the insert for args: with the routing columns only
// when args has them.
func (w *Writer) statement(args []any) string {
	if len(args) > 8 {
		return w.insertRouted
	}
	return w.insert
}

// args validates events and lays them out as column arrays, with the
// routing overrides only if an event sets one; nil args and nil error mean
// there is nothing to write.
func (w *Writer) args(ctx context.Context, events []Event) ([]any, error) {
	if len(events) == 0 {
		return nil, nil
	}
	traceparent, traced := TraceparentFromContext(ctx)
	n := len(events)
	var (
		ids      = make([]string, n)
		types    = make([]string, n)
		keys     = make([]*string, n)
		payloads = make([][]byte, n)
		ctypes   = make([]string, n)
		headers  = make([]string, n)
		corrs    = make([]*string, n)
		avail    = make([]*time.Time, n)
		rkeys    = make([]*string, n)
		exchs    = make([]*string, n)
		routed   bool
	)
	for i := range events {
		e := &events[i]
		if err := e.Validate(); err != nil {
			return nil, fmt.Errorf("event %d: %w", i, err)
		}
		id := e.ID
		if id == [16]byte{} {
			id = newID()
		}
		ids[i] = id.String()
		types[i] = e.Type
		if e.Key != "" {
			keys[i] = &e.Key
		}
		payloads[i] = e.Payload
		ctypes[i] = e.ContentType
		if ctypes[i] == "" {
			ctypes[i] = ContentTypeJSON
		}
		headers[i] = "{}"
		h := e.Headers
		if _, set := h[HeaderTraceparent]; traced && !set {
			h = make(map[string]string, len(e.Headers)+1)
			for k, v := range e.Headers {
				h[k] = v
			}
			h[HeaderTraceparent] = traceparent
		}
		if len(h) > 0 {
			b, err := json.Marshal(h)
			if err != nil {
				return nil, fmt.Errorf("event %d: %w: headers: %v", i, ErrInvalidEvent, err)
			}
			headers[i] = string(b)
		}
		if e.CorrelationID != "" {
			corrs[i] = &e.CorrelationID
		}
		if !e.AvailableAt.IsZero() {
			avail[i] = &e.AvailableAt
		}
		// Empty stays NULL: the relay's defaults (event_type, amqp.exchange).
		if e.RoutingKey != "" {
			rkeys[i], routed = &e.RoutingKey, true
		}
		if e.Exchange != "" {
			exchs[i], routed = &e.Exchange, true
		}
	}
	args := []any{ids, types, keys, payloads, ctypes, headers, corrs, avail}
	if routed {
		args = append(args, rkeys, exchs)
	}
	return args, nil
}
