package relay

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"
)

// Ordered mode (relay.ordering: partition_key) keeps each key's events in
// sequence order with three mechanisms:
//
//  1. Heads only. A batch takes, per key, only the lowest pending row (the
//     head), and only if no other transaction holds it locked. The next row
//     of a key becomes the head only once the previous one is committed as
//     dispatched (or dead), so one row per key is in flight, across all
//     replicas, whatever the partition leases say.
//
//  2. Commit horizon. seq is drawn at insert, but transactions commit in
//     another order: a committed row with seq 12 may have an uncommitted
//     sibling with seq 11 of the same key. A head is published only if its
//     seq is at or below the horizon: a seq value H such that every
//     transaction that drew a seq ≤ H has ended. Each writer locks the
//     outbox table (ROW EXCLUSIVE, held to its end) and has its transaction
//     id before it draws seq (tx_id is the table's first column; defaults
//     are evaluated in column order). So the relay reads the sequence's
//     last value L and then takes a fresh transaction id X, larger than
//     every id assigned before; once no transaction older than X holds a
//     lock on the outbox table (pg_locks), everyone who drew a seq ≤ L has
//     ended and L becomes the horizon. (A snapshot's xmax is not such a
//     bound: it is the latest *completed* id plus one, and running
//     transactions may hold larger ids. Its xmin is one, but it counts
//     every transaction in the cluster, so one long transaction anywhere
//     would stall ordered delivery.) Taking X costs one transaction id per
//     probe, only while new rows arrive, committed asynchronously. Cost for
//     producers: none; a transaction that has written to the outbox and
//     stays open holds back ordered rows committed after it started, for
//     as long as it stays open (outbox_relay_commit_horizon_wait_seconds).
//
//  3. Partition leases. Keys hash into relay.partitions virtual partitions;
//     each replica holds a session advisory lock per partition it owns, on a
//     connection of its own, so a replica that dies loses its leases with its
//     connection. Replicas count each other through member advisory locks
//     and each takes ceil(partitions / replicas), releasing extras between
//     batches. Leases split the work; order never depends on them.

// horizon tracks the commit horizon.
type horizon struct {
	safe       int64       // the horizon: every seq ≤ safe is settled
	latest     int64       // the highest seq of any candidate (or safe)
	candidates []candidate // (seq, xid) pairs waiting for old transactions to end
}

type candidate struct {
	seq   int64
	xid   uint64 // a transaction id taken after seq was read
	since time.Time
}

// advance reads the sequence and, if it moved, takes a fresh transaction id
// as a new candidate; then it promotes every candidate whose older
// transactions have all ended. It runs on the lease connection, whose
// commits are asynchronous: the transaction ids it takes need no flush.
func (h *horizon) advance(ctx context.Context, conn *pgx.Conn, q queries, seqName, table string) error {
	if conn == nil {
		return errors.New("read commit horizon: no lease connection")
	}
	var (
		last   int64
		xid    string
		writer *string
	)
	if err := conn.QueryRow(ctx, q.readHorizon, seqName, h.latest, table).Scan(&last, &xid, &writer); err != nil {
		return fmt.Errorf("read commit horizon: %w", err)
	}
	// Every transaction older than lo has ended or has no lock on the
	// outbox table, and so drew no seq.
	lo := uint64(math.MaxUint64)
	if writer != nil {
		w, err := strconv.ParseUint(*writer, 10, 64)
		if err != nil {
			return fmt.Errorf("parse writer transaction id %q: %w", *writer, err)
		}
		lo = w
	}
	now := time.Now()
	if xid != "" {
		x, err := strconv.ParseUint(xid, 10, 64)
		if err != nil {
			return fmt.Errorf("parse transaction id %q: %w", xid, err)
		}
		h.candidates = append(h.candidates, candidate{seq: last, xid: x, since: now})
		h.latest = max(h.latest, last)
	}
	n := 0
	for n < len(h.candidates) && h.candidates[n].xid <= lo {
		h.safe = max(h.safe, h.candidates[n].seq)
		n++
	}
	h.candidates = h.candidates[n:]
	// Bound the list: merging keeps the larger seq and the larger id, which
	// is conservative.
	if len(h.candidates) > 64 {
		h.candidates[1].since = h.candidates[0].since
		h.candidates = h.candidates[1:]
	}
	return nil
}

// reset forgets everything, the horizon included: it runs whenever the lease
// connection is replaced, which may be after a database crash or a failover,
// and then sequence values above the last durable one can be handed out
// again to transactions that are still running, so an old horizon would
// vouch for them. Starting over costs one probe round.
func (h *horizon) reset() { h.candidates, h.latest, h.safe = nil, 0, 0 }

// wait is how long the oldest candidate has waited for older transactions.
func (h *horizon) wait(now time.Time) time.Duration {
	if len(h.candidates) == 0 {
		return 0
	}
	return now.Sub(h.candidates[0].since)
}

// behind reports whether committed rows may be waiting above the horizon.
func (h *horizon) behind() bool { return len(h.candidates) > 0 }

// leases holds this replica's partition leases on a dedicated connection.
type leases struct {
	conn        *pgx.Conn
	member      int32 // member slot, -1 when none
	owned       []int32
	partitions  int
	classLease  int32 // advisory lock class of partition leases
	classMember int32 // advisory lock class of member slots
	next        time.Time
}

// maxMembers bounds member slots (replicas of one table).
const maxMembers = 1024

// rebalanceEvery is how often a replica recounts members and adjusts its
// share of partitions.
const rebalanceEvery = time.Second

// maintain (re)connects, registers as a member and takes or releases
// partitions towards an even share. It is called between batches only.
func (l *leases) maintain(ctx context.Context, r *Relay, connCfg *pgx.ConnConfig) error {
	if l.conn != nil && l.conn.IsClosed() {
		l.drop(ctx)
	}
	if l.conn != nil && time.Now().Before(l.next) {
		return nil
	}
	l.next = time.Now().Add(rebalanceEvery)
	if l.conn == nil {
		cfg := connCfg.Copy()
		// The horizon probe's transaction ids need no durability.
		cfg.RuntimeParams["synchronous_commit"] = "off"
		// Server-side keepalives: if this replica's host vanishes or is cut
		// off, PostgreSQL ends the session within about 25 s and its leases
		// go to the others, instead of after the OS default of two hours.
		for k, v := range map[string]string{"tcp_keepalives_idle": "10", "tcp_keepalives_interval": "5", "tcp_keepalives_count": "3"} {
			if _, set := cfg.RuntimeParams[k]; !set {
				cfg.RuntimeParams[k] = v
			}
		}
		conn, err := pgx.ConnectConfig(ctx, cfg)
		if err != nil {
			return fmt.Errorf("lease connection: %w", err)
		}
		l.conn = conn
		l.member = -1
		// A new connection may follow a crash the old one did not report.
		r.horizon.reset()
	}
	if err := l.rebalance(ctx, r); err != nil {
		l.drop(ctx)
		return err
	}
	return nil
}

func (l *leases) rebalance(ctx context.Context, r *Relay) error {
	if l.member < 0 {
		if err := l.conn.QueryRow(ctx, r.q.takeMemberSlot, l.classMember, maxMembers).Scan(&l.member); err != nil {
			return fmt.Errorf("take member slot: %w", err)
		}
	}
	var members int
	if err := l.conn.QueryRow(ctx, r.q.countMembers, l.classMember).Scan(&members); err != nil {
		return fmt.Errorf("count members: %w", err)
	}
	target := (l.partitions + max(members, 1) - 1) / max(members, 1)
	before := len(l.owned)
	if len(l.owned) > target {
		extra := l.owned[target:]
		if _, err := l.conn.Exec(ctx, r.q.releasePartitions, l.classLease, extra); err != nil {
			return fmt.Errorf("release partitions: %w", err)
		}
		l.owned = slices.Clone(l.owned[:target])
	}
	if len(l.owned) < target {
		rows, err := l.conn.Query(ctx, r.q.takePartitions, l.classLease, l.partitions, l.owned, target-len(l.owned))
		if err != nil {
			return fmt.Errorf("take partitions: %w", err)
		}
		got, err := pgx.CollectRows(rows, pgx.RowTo[int32])
		if err != nil {
			return fmt.Errorf("take partitions: %w", err)
		}
		l.owned = append(l.owned, got...)
		slices.Sort(l.owned)
	}
	r.m.PartitionsOwned.Set(float64(len(l.owned)))
	if len(l.owned) != before {
		r.log.Info("partitions rebalanced", zap.Int("members", members), zap.Int("owned", len(l.owned)),
			zap.Int("target", target), zap.Int32("member_slot", l.member))
	}
	return nil
}

// drop closes the lease connection: every lease goes with it.
func (l *leases) drop(ctx context.Context) {
	if l.conn != nil {
		_ = l.conn.Close(context.WithoutCancel(ctx))
	}
	l.conn, l.member, l.owned = nil, -1, nil
	l.next = time.Time{}
}

// ownedPartitions is the current lease set (nil before the first rebalance).
func (l *leases) ownedPartitions() []int32 { return l.owned }

// PartitionOwner is one replica's share of the partition leases.
type PartitionOwner struct {
	PID             int32     // backend pid of the replica's lease connection
	ApplicationName string    // from the replica's DSN (default "outbox-relay")
	ClientAddr      string    // empty for unix sockets
	Since           time.Time // when the lease connection started
	Partitions      []int32
}

// Querier is what PartitionOwners needs: a pool, a connection or a transaction.
type Querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

// PartitionOwners lists the replicas holding partition leases on schema.table
// and the partitions each holds, read from pg_locks.
func PartitionOwners(ctx context.Context, db Querier, schema, table string) ([]PartitionOwner, error) {
	t := Config{Postgres: PostgresConfig{Schema: schema, Table: table}}.table()
	if err := t.Validate(); err != nil {
		return nil, err
	}
	rows, err := db.Query(ctx, queryPartitionOwners, lockClass("lease "+t.String()))
	if err != nil {
		return nil, fmt.Errorf("partition owners: %w", err)
	}
	owners, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (PartitionOwner, error) {
		var o PartitionOwner
		err := row.Scan(&o.PID, &o.ApplicationName, &o.ClientAddr, &o.Since, &o.Partitions)
		return o, err
	})
	if err != nil {
		return nil, fmt.Errorf("partition owners: %w", err)
	}
	return owners, nil
}

// PartitionBacklog counts pending keyed rows per virtual partition, for a
// table whose keys hash into partitions partitions.
func PartitionBacklog(ctx context.Context, db Querier, schema, table string, partitions int) (map[int32]int64, error) {
	t := Config{Postgres: PostgresConfig{Schema: schema, Table: table}}.table()
	if err := t.Validate(); err != nil {
		return nil, err
	}
	rows, err := db.Query(ctx, fmt.Sprintf(queryPartitionBacklog, t.Quoted(), partitionOf(1)), partitions)
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
