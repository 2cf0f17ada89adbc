package relay

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"os"
	"slices"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"
)

// Ordered mode (relay.ordering: partition_key) keeps each key's events in
// sequence order with three mechanisms:
//
//  1. Heads only. A claim takes a keyed row only if it is its key's lowest
//     pending row (findHeads: one probe of the pending_key index per key,
//     so the cost follows the rows claimed, not the backlog), and only if
//     no other transaction holds it locked. The next row of a key becomes the
//     head only once the previous one is committed as dispatched (or dead),
//     so one row per key is in flight, across all replicas, whatever the
//     partition leases say.
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
//     every id assigned before; once no transaction older than X holds ROW
//     EXCLUSIVE on the outbox table in this database (pg_locks), everyone
//     who drew a seq ≤ L has ended and L becomes the horizon. Readers,
//     ANALYZE, the relays' own FOR UPDATE claims and other databases hold
//     other modes or other tables and do not count. The horizon is read
//     only when a claimed head lies above it: a drained backlog never reads
//     pg_locks. Such a head was claimed with a snapshot older than the new
//     horizon, so it is published only after a fresh statement confirms it
//     is still its key's lowest pending row (gate).
//
//  3. Partition leases. Keys hash into relay.partitions virtual partitions;
//     each replica holds leases with an expiry in <table>_leases, renewed
//     by its claim loop every sixth of relay.lease_timeout, and counts the
//     live replicas in <table>_relays to take ceil(partitions / replicas).
//     A replica that freezes stops renewing and its leases lapse. A claim
//     takes keyed rows only from partitions whose lease this replica holds
//     for at least half the timeout more, and a batch not sent within that
//     half is dropped, so a replica that wakes after losing a partition
//     publishes nothing of it. Leases split the work; order never depends
//     on them, only on row locks and the horizon.

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

// gate keeps, of a claimed ordered batch, the rows that may be published
// now: keyless rows, heads at or below the horizon known before the claim,
// and heads the horizon, read after the claim, covers and a fresh statement
// confirms are still their key's lowest pending row. The rest stay locked
// and untouched until the batch ends, and are claimed again later.
func (r *Relay) gate(ctx context.Context, tx pgx.Tx, msgs []Message, invalid []failure) ([]Message, []failure, error) {
	safe := r.horizon.safe
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
	if err := r.horizon.advance(ctx, r.pool, r.q, r.seqName, r.table.Quoted()); err != nil {
		return nil, nil, err
	}
	if r.horizon.safe < safe {
		safe = 0 // the horizon started over: vouch for nothing claimed against the old one
	}
	var recheck []int64
	for _, m := range msgs {
		if m.Key != "" && m.Seq > safe && m.Seq <= r.horizon.safe {
			recheck = append(recheck, m.Seq)
		}
	}
	for _, f := range invalid {
		if f.msg.Key != "" && f.msg.Seq > safe && f.msg.Seq <= r.horizon.safe {
			recheck = append(recheck, f.msg.Seq)
		}
	}
	heads := map[int64]bool{}
	if len(recheck) > 0 {
		rows, err := tx.Query(ctx, r.q.confirmHeads, recheck)
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
func (r *Relay) findHeads(ctx context.Context, tx pgx.Tx) ([]int64, error) {
	r.settledMu.Lock()
	keys, after := r.settledKeys, r.settledSeqs
	r.settledKeys, r.settledSeqs = nil, nil
	flying := make(map[string]bool, len(r.flying))
	for k := range r.flying {
		flying[k] = true
	}
	r.settledMu.Unlock()
	walk := 4 * r.cfg.Relay.BatchSize
	if len(keys) > 0 && r.settledHits >= r.cfg.Relay.BatchSize/2 {
		walk = max(1, r.cfg.Relay.BatchSize/16)
	}
	rows, err := tx.Query(ctx, r.q.findHeads, r.cursor, walk, r.leases.owned, r.cfg.Relay.Partitions, keys, after)
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
			r.found[seq] = foundHead{key, from}
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
		r.settledHits = hits
	}
	r.cursor = ""
	if n == walk {
		r.cursor = last // the next walk starts there
	}
	return heads, nil
}

// requeue keeps the keys of heads found but not published in this batch
// (beyond its size, or above the horizon) for the next claim's probes, so
// that their turn does not wait for a walk. When none is left, every head
// found is in flight, and claiming again before a batch settles would walk
// the keys for nothing (exhausted).
func (r *Relay) requeue(msgs []Message) {
	for _, m := range msgs {
		delete(r.found, m.Seq)
	}
	r.exhausted = len(r.found) == 0
	if r.exhausted {
		return
	}
	r.settledMu.Lock()
	for _, h := range r.found {
		if len(r.settledKeys) < 4*r.cfg.Relay.BatchSize {
			// Probed from where it was found, not from just below it: a
			// lower row of its key may have committed since.
			r.settledKeys = append(r.settledKeys, h.key)
			r.settledSeqs = append(r.settledSeqs, h.after)
		}
	}
	r.settledMu.Unlock()
	clear(r.found)
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
func (r *Relay) noteSent(msgs []Message) {
	r.settledMu.Lock()
	defer r.settledMu.Unlock()
	for _, m := range msgs {
		if m.Key != "" {
			r.flying[m.Key]++
		}
	}
}

// noteSettled records the keys of a settled batch's dispatched rows (done,
// nil if its transaction did not commit): the next claim looks for their
// next heads first.
func (r *Relay) noteSettled(msgs []Message, done []int64) {
	ok := make(map[int64]bool, len(done))
	for _, s := range done {
		ok[s] = true
	}
	r.settledMu.Lock()
	for _, m := range msgs {
		r.flying[m.Key]--
		if r.flying[m.Key] <= 0 {
			delete(r.flying, m.Key)
		}
		if m.Key != "" && ok[m.Seq] && len(r.settledKeys) < 4*r.cfg.Relay.BatchSize {
			r.settledKeys = append(r.settledKeys, m.Key)
			r.settledSeqs = append(r.settledSeqs, m.Seq)
		}
	}
	r.settledMu.Unlock()
}

// leases are this replica's partition leases, kept in the lease table and
// renewed by the claim loop (maintain), so they work through a pooler in
// transaction mode and lapse when the loop stops.
type leases struct {
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
func (l *leases) maintain(ctx context.Context, r *Relay, connCfg *pgx.ConnConfig) error {
	now := time.Now()
	if now.Before(l.next) {
		return nil
	}
	l.keepToken(ctx, r, connCfg)
	ms := l.timeout.Milliseconds()
	var (
		members int
		owned   []int32
	)
	if err := r.pool.QueryRow(ctx, r.q.renewLeases, l.owner, ms, l.partitions, l.token != nil, l.tokenClass).Scan(&members, &owned); err != nil {
		l.owned = nil
		return fmt.Errorf("renew partition leases: %w", err)
	}
	l.next = now.Add(l.renewEvery())
	before := len(l.owned)
	l.owned = owned
	target := (l.partitions + max(members, 1) - 1) / max(members, 1)
	if len(l.owned) > target {
		if _, err := r.pool.Exec(ctx, r.q.releasePartitions, l.owner, l.owned[target:]); err != nil {
			return fmt.Errorf("release partitions: %w", err)
		}
		l.owned = slices.Clone(l.owned[:target])
	}
	if len(l.owned) < target {
		rows, err := r.pool.Query(ctx, r.q.takePartitions, l.owner, ms, l.partitions, target-len(l.owned), l.tokenClass)
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
			zap.Int("target", target), zap.String("owner", l.owner))
	}
	return nil
}

// keepToken (re)connects the token connection and takes the token; on
// failure the replica runs without one until the next renewal (its leases
// then only expire).
func (l *leases) keepToken(ctx context.Context, r *Relay, connCfg *pgx.ConnConfig) {
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
		r.log.Debug("partition lease token", zap.Error(err))
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
func (l *leases) release(ctx context.Context, r *Relay) {
	if r.pool == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if _, err := r.pool.Exec(ctx, r.q.releaseAll, l.owner); err != nil && !isUndefinedTable(err) {
		r.log.Warn("release partition leases", zap.Error(err))
	}
	l.dropToken(ctx)
	l.lapse()
	r.m.PartitionsOwned.Set(0)
}

// errNotLive is Live's answer while the claim loop is stuck.
var errNotLive = errors.New("claim loop stuck")
