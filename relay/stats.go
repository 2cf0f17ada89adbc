package relay

import (
	"context"
	"errors"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"

	"github.com/outbox-relay/outbox-relay/metrics"
)

// statsLeaseMargin is added to the stats lease beyond three rounds.
const statsLeaseMargin = 5 * time.Second

// statsReader refreshes the table-wide backlog gauges. Replicas share a lease
// (readStats): its holder counts and exports the gauges, the others export
// none, so alerts on them fire once per table. The holder keeps exporting
// its last counts while the database is unreachable; their timestamp gauge
// then shows how stale they are.
type statsReader struct {
	pool     *pgxpool.Pool
	q        *queries
	owner    string // this replica's name in the stats lease
	interval time.Duration
	m        *metrics.Metrics
	log      *zap.Logger
}

func (s *statsReader) run(ctx context.Context) {
	defer s.release(ctx)
	wait := s.interval
	warned := false
	for {
		var (
			counts  []int64 // pending, delayed
			dead    int64
			age, at float64
		)
		began := time.Now()
		// The lease outlives three rounds plus a margin for a round slower
		// than the last, so its holder keeps it, and one that is gone frees
		// it soon.
		lease := 3*wait + statsLeaseMargin
		err := s.pool.QueryRow(ctx, s.q.readStats, s.owner, lease.Milliseconds()).Scan(&counts, &dead, &age, &at)
		took := time.Since(began)
		switch {
		case err == nil:
			s.m.Pending.Set(float64(counts[0]))
			s.m.Delayed.Set(float64(counts[1]))
			s.m.DeadRows.Set(float64(dead))
			s.m.OldestPendingAge.Set(age)
			s.m.StatsTimestamp.Set(at)
			s.m.SetTableStatsHeld(true)
		case errors.Is(err, pgx.ErrNoRows): // another replica holds the lease
			s.m.SetTableStatsHeld(false)
		case ctx.Err() == nil && isUndefinedTable(err) && !warned:
			// The stats lease came with schema version 4.
			s.log.Warn("cannot read the backlog gauges: a table is missing; run `outbox-relay migrate up`", zap.Error(err))
			warned = true
		case ctx.Err() == nil && !isUndefinedTable(err):
			s.log.Debug("read stats", zap.Error(err))
		}
		wait = statsWait(s.interval, took, lease)
		sleep(ctx, wait)
		if ctx.Err() != nil {
			return
		}
	}
}

// release gives the lease up at shutdown, so another replica
// takes the counts over at its next round instead of after the lease lapses.
func (s *statsReader) release(ctx context.Context) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
	defer cancel()
	if _, err := s.pool.Exec(ctx, s.q.releaseStats, s.owner); err != nil && !isUndefinedTable(err) {
		s.log.Debug("release stats lease", zap.Error(err))
	}
}

// statsWait is the pause before the next stats query: relay.stats_interval,
// stretched so the counts, which take time in proportion to the backlog
// (about 0.25 s per million pending rows), cost at most 1% of the
// database's time: a large backlog is when the relay needs it most. The
// stretch stops half a margin short of the lease just written (it began
// when the query did), so that a holder renews before its lease lapses and
// two replicas never export the gauges at once.
func statsWait(interval, took, lease time.Duration) time.Duration {
	return max(interval, min(100*took, lease-took-statsLeaseMargin/2))
}
