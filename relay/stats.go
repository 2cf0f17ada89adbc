package relay

import (
	"context"
	"errors"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"
)

// statsLeaseMargin is added to the stats lease beyond three rounds.
const statsLeaseMargin = 5 * time.Second

// statsLoop refreshes the table-wide backlog gauges. Replicas share a lease
// (readStats): its holder counts and exports the gauges, the others export
// none, so alerts on them fire once per table. The holder keeps exporting
// its last counts while the database is unreachable; their timestamp gauge
// then shows how stale they are.
func (r *Relay) statsLoop(ctx context.Context, pool *pgxpool.Pool) {
	defer r.releaseStatsLease(ctx, pool)
	wait := r.cfg.Relay.StatsInterval
	warned := false
	for {
		var pending, delayed, dead int64
		var age, at float64
		began := time.Now()
		// The lease outlives three rounds plus a margin for a round slower
		// than the last, so its holder keeps it, and one that is gone frees
		// it soon.
		lease := 3*wait + statsLeaseMargin
		err := pool.QueryRow(ctx, r.q.readStats, r.statsOwner, lease.Milliseconds()).Scan(&pending, &delayed, &dead, &age, &at)
		took := time.Since(began)
		switch {
		case err == nil:
			r.m.Pending.Set(float64(pending))
			r.m.Delayed.Set(float64(delayed))
			r.m.DeadRows.Set(float64(dead))
			r.m.OldestPendingAge.Set(age)
			r.m.StatsTimestamp.Set(at)
			r.m.SetTableStatsHeld(true)
		case errors.Is(err, pgx.ErrNoRows): // another replica holds the lease
			r.m.SetTableStatsHeld(false)
		case ctx.Err() == nil && isUndefinedTable(err) && !warned:
			// The stats lease came with schema version 4.
			r.log.Warn("cannot read the backlog gauges: a table is missing; run `outbox-relay migrate up`", zap.Error(err))
			warned = true
		case ctx.Err() == nil && !isUndefinedTable(err):
			r.log.Debug("read stats", zap.Error(err))
		}
		wait = statsWait(r.cfg.Relay.StatsInterval, took)
		sleep(ctx, wait)
		if ctx.Err() != nil {
			return
		}
	}
}

// releaseStatsLease gives the lease up at shutdown, so another replica
// takes the counts over at its next round instead of after the lease lapses.
func (r *Relay) releaseStatsLease(ctx context.Context, pool *pgxpool.Pool) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
	defer cancel()
	if _, err := pool.Exec(ctx, r.q.releaseStats, r.statsOwner); err != nil && !isUndefinedTable(err) {
		r.log.Debug("release stats lease", zap.Error(err))
	}
}

// statsWait is the pause before the next stats query: relay.stats_interval,
// stretched so the counts, which take time in proportion to the backlog
// (about 0.25 s per million pending rows), cost at most 1% of the
// database's time: a large backlog is when the relay needs it most.
func statsWait(interval, took time.Duration) time.Duration {
	return max(interval, 100*took)
}
