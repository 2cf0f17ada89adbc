package relay

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// CleanDispatchedOnce runs one pass of the retention cleaner over pool and
// returns the rows it deleted and the pages it read.
func CleanDispatchedOnce(ctx context.Context, r *Relay, pool *pgxpool.Pool) (deleted, pages int64) {
	return r.cleaner(pool).cleanDispatched(ctx)
}

// CleanArchivedOnce runs one pass of the archive's retention over pool and
// returns the rows it deleted and the pages it read.
func CleanArchivedOnce(ctx context.Context, r *Relay, pool *pgxpool.Pool) (deleted, pages int64) {
	return r.cleaner(pool).cleanArchived(ctx)
}

// StatsWait is statsWait, for its unit test.
var StatsWait = statsWait

// Backoff is backoff, for its unit test.
var Backoff = backoff

// LastTurn is when r's claim loop last began a turn.
func LastTurn(r *Relay) time.Time { return time.Unix(0, r.lastLoop.Load()) }
