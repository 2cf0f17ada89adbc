package relay

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// leases are this replica's partition leases, kept in the lease table and
// renewed by the claim loop (maintain), so they work through a pooler in
// transaction mode and lapse when the loop stops.
type leases struct {
	q     *queries
	log   *zap.Logger
	gauge prometheus.Gauge // partitions owned

	owner      string // this replica's name in the lease tables
	timeout    time.Duration
	partitions int
	owned      []int32
	next       time.Time // next renewal

	// token is a connection of this replica's own holding a session
	// advisory lock (tokenClass, hashtext(owner)) while the process lives:
	// when it dies, PostgreSQL ends the session and the others take its
	// partitions at their next renewal instead of after timeout. A frozen
	// process keeps it; the expiry covers that. None behind a pooler in
	// transaction mode (noToken), where a session lock would stay behind.
	token      *pgx.Conn
	tokenClass int32
	noToken    bool
}

// newOwner names a replica: host, process id and a random suffix, so
// replicas in one process (tests) and restarts never share a name.
func newOwner() string {
	host, _ := os.Hostname()
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return fmt.Sprintf("%s/%d/%s", host, os.Getpid(), hex.EncodeToString(b))
}

// renewEvery is how often the claim loop renews its leases and rebalances:
// a sixth of the timeout, and at least every second, so the partitions of
// a replica that died move within about a second.
func (l *leases) renewEvery() time.Duration { return min(l.timeout/6, time.Second) }

// claimMargin is how long a lease must still run for a claim to take rows
// of its partition; a batch not sent within it is dropped (fresh).
func (l *leases) claimMargin() time.Duration { return l.timeout / 2 }

// maintain renews this replica's membership and leases and takes or
// releases partitions towards ceil(partitions / live replicas). It runs
// between batches, every renewEvery.
func (l *leases) maintain(ctx context.Context, pool *pgxpool.Pool, connCfg *pgx.ConnConfig) error {
	now := time.Now()
	if now.Before(l.next) {
		return nil
	}
	l.keepToken(ctx, connCfg)
	ms := l.timeout.Milliseconds()
	var (
		members int
		owned   []int32
	)
	// Each statement in a writeTx: a renewal lost in a database crash
	// costs nothing (the claim reads the lease table), and the renewals,
	// about one a second per replica, need no WAL flush.
	err := pgx.BeginTxFunc(ctx, pool, writeTx, func(tx pgx.Tx) error {
		return tx.QueryRow(ctx, l.q.renewLeases, l.owner, ms, l.partitions, l.token != nil, l.tokenClass).Scan(&members, &owned)
	})
	if err != nil {
		l.owned = nil
		return fmt.Errorf("renew partition leases: %w", err)
	}
	l.next = now.Add(l.renewEvery())
	before := len(l.owned)
	l.owned = owned
	target := (l.partitions + max(members, 1) - 1) / max(members, 1)
	if len(l.owned) > target {
		err := pgx.BeginTxFunc(ctx, pool, writeTx, func(tx pgx.Tx) error {
			_, err := tx.Exec(ctx, l.q.releasePartitions, l.owner, l.owned[target:])
			return err
		})
		if err != nil {
			return fmt.Errorf("release partitions: %w", err)
		}
		l.owned = slices.Clone(l.owned[:target])
	}
	if len(l.owned) < target {
		var got []int32
		err := pgx.BeginTxFunc(ctx, pool, writeTx, func(tx pgx.Tx) error {
			rows, err := tx.Query(ctx, l.q.takePartitions, l.owner, ms, l.partitions, target-len(l.owned), l.tokenClass)
			if err == nil {
				got, err = pgx.CollectRows(rows, pgx.RowTo[int32])
			}
			return err
		})
		if err != nil {
			return fmt.Errorf("take partitions: %w", err)
		}
		l.owned = append(l.owned, got...)
		slices.Sort(l.owned)
	}
	l.gauge.Set(float64(len(l.owned)))
	if len(l.owned) != before {
		l.log.Info("partitions rebalanced", zap.Int("members", members), zap.Int("owned", len(l.owned)),
			zap.Int("target", target), zap.String("owner", l.owner))
	}
	return nil
}

// keepToken (re)connects the token connection and takes the token; on
// failure the replica runs without one until the next renewal (its leases
// then only expire).
func (l *leases) keepToken(ctx context.Context, connCfg *pgx.ConnConfig) {
	if l.noToken {
		return
	}
	if l.token != nil && !l.token.IsClosed() {
		return
	}
	l.dropToken(ctx)
	cfg := connCfg.Copy()
	// If this replica's host vanishes, PostgreSQL ends the session within
	// about 25 s rather than the OS default of two hours (the leases
	// expire sooner anyway).
	for k, v := range map[string]string{"tcp_keepalives_idle": "10", "tcp_keepalives_interval": "5", "tcp_keepalives_count": "3"} {
		if _, set := cfg.RuntimeParams[k]; !set {
			cfg.RuntimeParams[k] = v
		}
	}
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err == nil {
		_, err = conn.Exec(ctx, `SELECT pg_advisory_lock($1::int4, hashtext($2))`, l.tokenClass, l.owner)
		if err != nil {
			_ = conn.Close(context.WithoutCancel(ctx))
		}
	}
	if err != nil {
		l.log.Debug("partition lease token", zap.Error(err))
		return
	}
	l.token = conn
}

func (l *leases) dropToken(ctx context.Context) {
	if l.token != nil {
		_ = l.token.Close(context.WithoutCancel(ctx))
		l.token = nil
	}
}

// lapse forgets the leases after an error: the claim statement checks them
// in the table anyway, and the next maintain renews what is still held.
func (l *leases) lapse() { l.owned, l.next = nil, time.Time{} }

// release gives up every lease and the membership at shutdown, so the other
// replicas take the partitions at their next renewal, not after the timeout.
func (l *leases) release(ctx context.Context, pool *pgxpool.Pool) {
	if pool == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if _, err := pool.Exec(ctx, l.q.releaseAll, l.owner); err != nil && !isUndefinedTable(err) {
		l.log.Warn("release partition leases", zap.Error(err))
	}
	l.dropToken(ctx)
	l.lapse()
	l.gauge.Set(0)
}

// lockClass derives a positive advisory-lock class from a name (FNV-1a).
func lockClass(name string) int32 {
	h := uint32(2166136261)
	for i := 0; i < len(name); i++ {
		h ^= uint32(name[i])
		h *= 16777619
	}
	return int32(h & 0x7fffffff)
}
