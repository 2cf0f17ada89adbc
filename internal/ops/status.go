package ops

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/outbox-relay/outbox-relay/schema"
)

// Status is the state of an outbox table, read in one snapshot.
type Status struct {
	Table      string
	ObservedAt time.Time // the database's now()

	SchemaVersion *int64 // nil when goose's version table is missing
	SchemaLatest  int64  // newest migration this binary carries
	NotifyTrigger string // NotifyEnabled, NotifyDisabled or NotifyMissing

	Pending                 int64
	DueNow                  int64
	OldestPendingAgeSeconds *float64 // nil when nothing is pending
	Dead                    int64

	Dispatched DispatchCounts

	EventTypes      []TypeCount // top StatusOptions.TopTypes by pending
	EventTypesTotal int64       // types with pending or dead rows

	// Partitions is set in ordered mode (relay.ordering: partition_key):
	// which replica leases which partitions, and their backlogs.
	Partitions *PartitionStatus
}

// PartitionStatus is the lease ownership of ordered mode.
type PartitionStatus struct {
	Count   int // relay.partitions
	Owners  []PartitionOwner
	Pending map[int32]int64 // keyed pending rows by partition
	Unowned []int32         // partitions no replica holds (none while relays run)
}

// DispatchCounts are rows marked dispatched recently, counted in the
// archive of dispatched rows.
type DispatchCounts struct {
	LastMinute   int64
	Last5Minutes int64
	// Exact is false when dispatched rows are not kept at all.
	Exact bool
	Note  string
}

// TypeCount is the pending and dead rows of one event type.
type TypeCount struct {
	EventType string
	Pending   int64
	Dead      int64
}

// StatusOptions says what Status reads.
type StatusOptions struct {
	KeepDispatched bool // relay.on_dispatch is mark, so dispatched rows are there to count
	Partitions     int  // relay.partitions in ordered mode; 0: not ordered
	TopTypes       int  // event types listed, by pending count
}

// Status reads every number in one read-only REPEATABLE READ transaction,
// so they add up (and now() is one instant).
func (o *Outbox) Status(ctx context.Context, conn *pgx.Conn, opt StatusOptions) (Status, error) {
	q := o.q
	rep := Status{Table: o.table.String(), EventTypes: []TypeCount{}}
	latest, err := o.latestMigration(conn)
	if err != nil {
		return rep, err
	}
	rep.SchemaLatest = latest

	err = pgx.BeginTxFunc(ctx, conn, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly}, func(tx pgx.Tx) error {
		if err := tx.QueryRow(ctx, q.statusBacklog).Scan(&rep.Pending, &rep.DueNow,
			&rep.OldestPendingAgeSeconds, &rep.Dead, &rep.ObservedAt); err != nil {
			return fmt.Errorf("backlog: %w", err)
		}

		var archived bool
		if err := tx.QueryRow(ctx, q.tableExists, q.archive).Scan(&archived); err != nil {
			return fmt.Errorf("dispatched: %w", err)
		}
		switch {
		case opt.KeepDispatched && archived:
			d := &rep.Dispatched
			if err := tx.QueryRow(ctx, q.statusDispatched).Scan(&d.LastMinute, &d.Last5Minutes); err != nil {
				return fmt.Errorf("dispatched: %w", err)
			}
			d.Exact = true
		case opt.KeepDispatched:
			rep.Dispatched.Note = "unknown: no archive of dispatched rows yet (run `outbox-relay migrate up`)"
		default:
			rep.Dispatched.Note = "unknown: relay.on_dispatch is delete, so dispatched rows are not kept"
		}

		rows, err := tx.Query(ctx, q.statusTypes, opt.TopTypes)
		if err != nil {
			return fmt.Errorf("event types: %w", err)
		}
		var tc TypeCount
		if _, err := pgx.ForEachRow(rows, []any{&tc.EventType, &tc.Pending, &tc.Dead, &rep.EventTypesTotal}, func() error {
			rep.EventTypes = append(rep.EventTypes, tc)
			return nil
		}); err != nil {
			return fmt.Errorf("event types: %w", err)
		}

		var versioned bool
		if err := tx.QueryRow(ctx, q.tableExists, q.versionTable).Scan(&versioned); err != nil {
			return fmt.Errorf("schema version: %w", err)
		}
		if versioned {
			var v int64
			if err := tx.QueryRow(ctx, q.schemaVersion).Scan(&v); err != nil {
				return fmt.Errorf("schema version: %w", err)
			}
			rep.SchemaVersion = &v
		}

		if opt.Partitions > 0 {
			ps, err := o.partitionStatus(ctx, tx, opt.Partitions)
			if err != nil {
				return err
			}
			rep.Partitions = ps
		}

		if rep.NotifyTrigger, err = o.NotifyState(ctx, tx); err != nil {
			return fmt.Errorf("notify trigger: %w", err)
		}
		return nil
	})
	return rep, err
}

// partitionStatus reads lease owners (the lease table) and per-partition
// backlogs of n partitions.
func (o *Outbox) partitionStatus(ctx context.Context, tx pgx.Tx, n int) (*PartitionStatus, error) {
	owners, err := o.PartitionOwners(ctx, tx)
	if err != nil {
		return nil, err
	}
	backlog, err := o.PartitionBacklog(ctx, tx, n)
	if err != nil {
		return nil, err
	}
	ps := &PartitionStatus{Count: n, Pending: backlog, Owners: owners, Unowned: []int32{}}
	owned := map[int32]bool{}
	for _, po := range owners {
		for _, p := range po.Partitions {
			owned[p] = true
		}
	}
	for p := int32(0); p < int32(n); p++ {
		if !owned[p] {
			ps.Unowned = append(ps.Unowned, p)
		}
	}
	return ps, nil
}

// latestMigration is the newest migration version this binary carries. The
// database/sql handle goose wants is never used, so it opens no connection.
func (o *Outbox) latestMigration(conn *pgx.Conn) (int64, error) {
	db := stdlib.OpenDB(*conn.Config())
	defer db.Close()
	m, err := schema.NewMigrator(db, o.table.Schema, o.table.Name)
	if err != nil {
		return 0, err
	}
	return m.Latest(), nil
}
