package ops

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// PartitionOwner is one replica's share of the partition leases of ordered
// mode.
type PartitionOwner struct {
	Owner           string    // the replica's name: host/pid/random
	PID             int32     // backend pid of the connection that registered the replica
	ApplicationName string    // from the replica's DSN (default "outbox-relay")
	ClientAddr      string    // empty for unix sockets
	Since           time.Time // when the replica registered
	Partitions      []int32
}

// PartitionOwners lists the replicas holding live partition leases on
// schema.table and the partitions each holds.
func PartitionOwners(ctx context.Context, db DB, schema, table string) ([]PartitionOwner, error) {
	o, err := New(schema, table)
	if err != nil {
		return nil, err
	}
	return o.PartitionOwners(ctx, db)
}

// PartitionOwners lists the replicas holding live partition leases on the
// table and the partitions each holds.
func (o *Outbox) PartitionOwners(ctx context.Context, db DB) ([]PartitionOwner, error) {
	rows, err := db.Query(ctx, o.q.partitionOwners)
	if err != nil {
		return nil, fmt.Errorf("partition owners: %w", err)
	}
	owners, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (PartitionOwner, error) {
		var po PartitionOwner
		err := row.Scan(&po.Owner, &po.PID, &po.ApplicationName, &po.ClientAddr, &po.Since, &po.Partitions)
		return po, err
	})
	if err != nil {
		return nil, fmt.Errorf("partition owners: %w", err)
	}
	return owners, nil
}

// PartitionBacklog counts pending keyed rows per virtual partition, for a
// table whose keys hash into partitions partitions.
func (o *Outbox) PartitionBacklog(ctx context.Context, db DB, partitions int) (map[int32]int64, error) {
	rows, err := db.Query(ctx, o.q.partitionBacklog, partitions)
	if err != nil {
		return nil, fmt.Errorf("partition backlog: %w", err)
	}
	out := map[int32]int64{}
	var (
		p int32
		n int64
	)
	_, err = pgx.ForEachRow(rows, []any{&p, &n}, func() error {
		out[p] = n
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("partition backlog: %w", err)
	}
	return out, nil
}
