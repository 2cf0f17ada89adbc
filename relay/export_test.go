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

// ClaimAbove runs one unordered claim over pool as if the last full claim
// had ended at seq floor, and returns the seqs it took; its transaction is
// rolled back.
func ClaimAbove(ctx context.Context, r *Relay, pool *pgxpool.Pool, floor int64) ([]int64, error) {
	r.floor = claimFloor{seq: floor, from: time.Now()}
	tx, err := pool.Begin(ctx)
	if err != nil {
		return nil, err
	}
	defer func() { _ = tx.Rollback(ctx) }()
	msgs, _, err := r.claim(ctx, tx, r.cfg.Relay.BatchBytes, true)
	seqs := make([]int64, len(msgs))
	for i, m := range msgs {
		seqs[i] = m.Seq
	}
	return seqs, err
}
