package relay

import (
	"context"
	"fmt"
	"slices"
	"sync"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Ordered mode (relay.ordering: partition_key) keeps each key's events in
// seq order with three mechanisms: a claim takes only a key's head (this
// file), a head above the commit horizon waits (horizon.go), and partition
// leases split the keys between replicas (leases.go). docs/ordering.md
// explains why each is sound.

// ordered is ordered mode's state. The claim loop's goroutine uses it
// alone, but for the keys in flight and settled, which the settler also
// writes (mu).
type ordered struct {
	q          *queries
	table      string // the outbox table, quoted
	batchSize  int
	partitions int

	horizon horizon
	leases  leases
	seqName string              // the seq column's sequence, found by checkSchema
	held    int                 // rows the last claim left unpublished above the commit horizon
	cursor  string              // the key findHeads starts from
	found   map[int64]foundHead // heads the last findHeads found, by seq

	settledHits int  // heads the last claim found among settled keys
	exhausted   bool // the last claim took every head it found

	// Keys whose batches settled since the last claim, with the dispatched
	// row of each, and keys in batches in flight.
	mu          sync.Mutex
	settledKeys []string
	settledSeqs []int64
	flying      map[string]int
}

func newOrdered(q *queries, table string, batchSize, partitions int, l leases) *ordered {
	return &ordered{
		q:          q,
		table:      table,
		batchSize:  batchSize,
		partitions: partitions,
		leases:     l,
		found:      map[int64]foundHead{},
		flying:     map[string]int{},
	}
}

// gate keeps, of a claimed ordered batch, the rows that may be published
// now: keyless rows, heads at or below the horizon known before the claim,
// and heads the horizon, read after the claim, covers and a fresh statement
// confirms are still their key's lowest pending row. The rest stay locked
// and untouched until the batch ends, and are claimed again later.
func (o *ordered) gate(ctx context.Context, pool *pgxpool.Pool, tx pgx.Tx, msgs []Message, invalid []failure) ([]Message, []failure, error) {
	safe := o.horizon.safe
	above := false
	for _, m := range msgs {
		above = above || (m.Key != "" && m.Seq > safe)
	}
	for _, f := range invalid {
		above = above || (f.msg.Key != "" && f.msg.Seq > safe)
	}
	if !above {
		return msgs, invalid, nil
	}
	if err := o.horizon.advance(ctx, pool, *o.q, o.seqName, o.table); err != nil {
		return nil, nil, err
	}
	if o.horizon.safe < safe {
		safe = 0 // the horizon started over: vouch for nothing claimed against the old one
	}
	var recheck []int64
	for _, m := range msgs {
		if m.Key != "" && m.Seq > safe && m.Seq <= o.horizon.safe {
			recheck = append(recheck, m.Seq)
		}
	}
	for _, f := range invalid {
		if f.msg.Key != "" && f.msg.Seq > safe && f.msg.Seq <= o.horizon.safe {
			recheck = append(recheck, f.msg.Seq)
		}
	}
	heads := map[int64]bool{}
	if len(recheck) > 0 {
		rows, err := tx.Query(ctx, o.q.confirmHeads, recheck)
		if err != nil {
			return nil, nil, fmt.Errorf("confirm heads: %w", err)
		}
		seqs, err := pgx.CollectRows(rows, pgx.RowTo[int64])
		if err != nil {
			return nil, nil, fmt.Errorf("confirm heads: %w", err)
		}
		for _, s := range seqs {
			heads[s] = true
		}
	}
	keep := func(key string, seq int64) bool { return key == "" || seq <= safe || heads[seq] }
	msgs = slices.DeleteFunc(msgs, func(m Message) bool { return !keep(m.Key, m.Seq) })
	invalid = slices.DeleteFunc(invalid, func(f failure) bool { return !keep(f.msg.Key, f.msg.Seq) })
	return msgs, invalid, nil
}

// findHeads returns the heads claimOrdered may take: the next heads of the
// keys whose batches settled since the last claim (one probe each: after a
// settle, that is where the work is), and those of a walk over the keys
// from where the last walk stopped, so that every key gets its turn however
// many keys there are. While the settled keys yield half a batch or more
// (a backlog), the walk is short: it only has to discover keys, and
// visiting keys whose heads are in flight costs a probe each for nothing.
func (o *ordered) findHeads(ctx context.Context, tx pgx.Tx) ([]int64, error) {
	o.mu.Lock()
	keys, after := o.settledKeys, o.settledSeqs
	o.settledKeys, o.settledSeqs = nil, nil
	flying := make(map[string]bool, len(o.flying))
	for k := range o.flying {
		flying[k] = true
	}
	o.mu.Unlock()
	walk := 4 * o.batchSize
	if len(keys) > 0 && o.settledHits >= o.batchSize/2 {
		walk = max(1, o.batchSize/16)
	}
	rows, err := tx.Query(ctx, o.q.findHeads, o.cursor, walk, o.leases.owned, o.partitions, keys, after)
	if err != nil {
		return nil, fmt.Errorf("find heads: %w", err)
	}
	var (
		walked, usable bool
		key, last      string
		from, seq      int64
		heads          []int64
		n, hits        int
	)
	_, err = pgx.ForEachRow(rows, []any{&walked, &key, &from, &seq, &usable}, func() error {
		if walked {
			n++
			last = key
		}
		if usable && !flying[key] {
			heads = append(heads, seq)
			o.found[seq] = foundHead{key, from}
			if !walked {
				hits++
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("find heads: %w", err)
	}
	if len(keys) > 0 {
		o.settledHits = hits
	}
	o.cursor = ""
	if n == walk {
		o.cursor = last // the next walk starts there
	}
	return heads, nil
}

// requeue keeps the keys of heads found but not published in this batch
// (beyond its size, or above the horizon) for the next claim's probes, so
// that their turn does not wait for a walk. When none is left, every head
// found is in flight, and claiming again before a batch settles would walk
// the keys for nothing (exhausted).
func (o *ordered) requeue(msgs []Message) {
	for _, m := range msgs {
		delete(o.found, m.Seq)
	}
	o.exhausted = len(o.found) == 0
	if o.exhausted {
		return
	}
	o.mu.Lock()
	for _, h := range o.found {
		if len(o.settledKeys) < 4*o.batchSize {
			// Probed from where it was found, not from just below it: a
			// lower row of its key may have committed since.
			o.settledKeys = append(o.settledKeys, h.key)
			o.settledSeqs = append(o.settledSeqs, h.after)
		}
	}
	o.mu.Unlock()
	clear(o.found)
}

// foundHead is a head findHeads found: its key, and the seq of the key's
// row dispatched just before (0 when found by the walk), below which the
// key has no pending row and never will.
type foundHead struct {
	key   string
	after int64
}

// noteSent records the keys of a batch in flight: their heads are locked
// by it, and findHeads leaves them out of the claim.
func (o *ordered) noteSent(msgs []Message) {
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, m := range msgs {
		if m.Key != "" {
			o.flying[m.Key]++
		}
	}
}

// noteSettled records the keys of a settled batch's dispatched rows (done,
// nil if its transaction did not commit): the next claim looks for their
// next heads first.
func (o *ordered) noteSettled(msgs []Message, done []int64) {
	ok := make(map[int64]bool, len(done))
	for _, s := range done {
		ok[s] = true
	}
	o.mu.Lock()
	for _, m := range msgs {
		o.flying[m.Key]--
		if o.flying[m.Key] <= 0 {
			delete(o.flying, m.Key)
		}
		if m.Key != "" && ok[m.Seq] && len(o.settledKeys) < 4*o.batchSize {
			o.settledKeys = append(o.settledKeys, m.Key)
			o.settledSeqs = append(o.settledSeqs, m.Seq)
		}
	}
	o.mu.Unlock()
}
