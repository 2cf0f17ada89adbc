package relay

import (
	"context"
	"fmt"
	"math"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// horizon tracks the commit horizon.
type horizon struct {
	safe       int64       // the horizon: every seq ≤ safe is settled
	latest     int64       // the highest seq of any candidate (or safe)
	candidates []candidate // (seq, xid) pairs waiting for old transactions to end
	started    time.Time   // the server's start time when the horizon was read
}

type candidate struct {
	seq   int64
	xid   uint64 // a transaction id taken after seq was read
	since time.Time
}

// advance reads the sequence and, if it moved, takes a fresh transaction id
// as a new candidate; then it promotes every candidate whose older writers
// have all ended. It runs in a transaction of its own, committed
// asynchronously: the transaction ids it takes need no flush.
func (h *horizon) advance(ctx context.Context, pool *pgxpool.Pool, q queries, seqName, table string) error {
	var (
		last    int64
		xid     string
		writer  *string
		started time.Time
	)
	// writeTx: the transaction id it may take commits without a WAL flush.
	err := pgx.BeginTxFunc(ctx, pool, writeTx, func(tx pgx.Tx) error {
		return tx.QueryRow(ctx, q.readHorizon, seqName, h.latest, table).Scan(&last, &xid, &writer, &started)
	})
	if err != nil {
		return fmt.Errorf("read commit horizon: %w", err)
	}
	if !started.Equal(h.started) {
		// A restarted server (or another one, after a failover) may hand
		// out sequence values above the last durable one again, to
		// transactions still running: an old horizon would vouch for them.
		wasSet := !h.started.IsZero()
		h.reset()
		h.started = started
		if wasSet {
			// The id was taken against the old horizon's latest: read again.
			return h.advance(ctx, pool, q, seqName, table)
		}
	}
	// Every transaction older than lo has ended or holds no ROW EXCLUSIVE
	// lock on the outbox table, and so drew no seq that is still open.
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

// reset forgets everything, the horizon included (see advance). Starting
// over costs one probe round.
func (h *horizon) reset() { h.candidates, h.latest, h.safe, h.started = nil, 0, 0, time.Time{} }

// wait is how long the oldest candidate has waited for older transactions.
func (h *horizon) wait(now time.Time) time.Duration {
	if len(h.candidates) == 0 {
		return 0
	}
	return now.Sub(h.candidates[0].since)
}
