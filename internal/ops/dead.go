package ops

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// DeadFilter selects dead events; its zero value selects them all. Each
// field is a parameter of deadMatch (queries.go); nil or zero there means
// no bound.
type DeadFilter struct {
	IDs       []uuid.UUID
	Types     []string
	OlderThan time.Duration // died more than this long ago
	NewerThan time.Duration // died at most this long ago
	// Seqs pins the filter to exactly the rows an operator confirmed, so
	// rows that die while a prompt is read are not swept up with them.
	Seqs []int64
}

func (f DeadFilter) args() []any {
	a := []any{nil, nil, nil, nil, nil}
	if f.IDs != nil {
		a[0] = f.IDs
	}
	if f.Types != nil {
		a[1] = f.Types
	}
	if f.OlderThan > 0 {
		a[2] = f.OlderThan
	}
	if f.NewerThan > 0 {
		a[3] = f.NewerThan
	}
	if f.Seqs != nil {
		a[4] = f.Seqs
	}
	return a
}

// DeadEvent is one dead event.
type DeadEvent struct {
	Seq           int64
	ID            uuid.UUID
	EventType     string
	PartitionKey  *string
	ContentType   string
	Headers       json.RawMessage
	CorrelationID *string
	CreatedAt     time.Time
	AvailableAt   time.Time
	Attempts      int
	LastError     *string
	DeadAt        time.Time
	AgeSeconds    float64 // by the database's clock
	Body          []byte  // the payload, when asked for
}

// ListDead returns up to limit dead events of f, newest first, with their
// payloads if withPayload.
func (o *Outbox) ListDead(ctx context.Context, db DB, f DeadFilter, withPayload bool, limit int) ([]DeadEvent, error) {
	rows, err := db.Query(ctx, o.q.deadList, append(f.args(), withPayload, limit)...)
	if err != nil {
		return nil, fmt.Errorf("list dead events: %w", err)
	}
	list, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (DeadEvent, error) {
		var e DeadEvent
		err := row.Scan(&e.Seq, &e.ID, &e.EventType, &e.PartitionKey, &e.ContentType, &e.Headers,
			&e.CorrelationID, &e.CreatedAt, &e.AvailableAt, &e.Attempts, &e.LastError, &e.DeadAt,
			&e.AgeSeconds, &e.Body)
		return e, err
	})
	if err != nil {
		return nil, fmt.Errorf("list dead events: %w", err)
	}
	return list, nil
}

// CountDead counts every dead event.
func (o *Outbox) CountDead(ctx context.Context, db DB) (int64, error) {
	var n int64
	if err := db.QueryRow(ctx, o.q.deadTotal).Scan(&n); err != nil {
		return 0, fmt.Errorf("count dead events: %w", err)
	}
	return n, nil
}

// SelectDead returns the seqs of the dead events of f, for a prompt to
// count and a DeadFilter.Seqs to pin.
func (o *Outbox) SelectDead(ctx context.Context, db DB, f DeadFilter) ([]int64, error) {
	rows, err := db.Query(ctx, o.q.deadSelect, f.args()...)
	if err != nil {
		return nil, fmt.Errorf("select dead events: %w", err)
	}
	seqs, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		return nil, fmt.Errorf("select dead events: %w", err)
	}
	return seqs, nil
}

// RetryDead makes the dead events of f due again with a fresh attempt
// budget and returns their ids. It wakes a relay in wake.mode notify in the
// same transaction: the insert trigger does not announce updates.
func (o *Outbox) RetryDead(ctx context.Context, db DB, f DeadFilter) ([]uuid.UUID, error) {
	var retried []uuid.UUID
	err := pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error {
		rows, err := tx.Query(ctx, o.q.deadRetry, f.args()...)
		if err != nil {
			return err
		}
		retried, err = pgx.CollectRows(rows, pgx.RowTo[uuid.UUID])
		if err != nil || len(retried) == 0 {
			return err
		}
		_, err = tx.Exec(ctx, o.q.wakeRelay, o.table.Channel())
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("retry dead events in %s: %w", o.table, err)
	}
	return retried, nil
}

// States of an event, as EventStates reports them.
const (
	StateDead       = "dead"
	StateDispatched = "dispatched"
	StatePending    = "pending"
)

// EventStates returns the state of each of ids found in the table, to say
// why an event was not retried; ids not found are absent. Its errors are
// the database's, for the caller to say what it looked up.
func (o *Outbox) EventStates(ctx context.Context, db DB, ids []uuid.UUID) (map[uuid.UUID]string, error) {
	rows, err := db.Query(ctx, o.q.idStates, ids)
	if err != nil {
		return nil, err
	}
	state := map[uuid.UUID]string{}
	var (
		id uuid.UUID
		s  string
	)
	if _, err := pgx.ForEachRow(rows, []any{&id, &s}, func() error { state[id] = s; return nil }); err != nil {
		return nil, err
	}
	return state, nil
}

// PurgeDead deletes the dead events of f and returns how many it deleted.
func (o *Outbox) PurgeDead(ctx context.Context, db DB, f DeadFilter) (int64, error) {
	tag, err := db.Exec(ctx, o.q.deadPurge, f.args()...)
	if err != nil {
		return 0, fmt.Errorf("purge dead events in %s: %w", o.table, err)
	}
	return tag.RowsAffected(), nil
}
