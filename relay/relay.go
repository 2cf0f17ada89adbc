// Package relay is the outbox relay's engine: a wake source drives a claim
// loop that claims due rows with FOR UPDATE SKIP LOCKED, publishes them with
// confirms outstanding together, and in the same transaction marks exactly
// the confirmed rows dispatched and schedules the failed ones for retry. A
// crash before commit releases the locks and the rows are claimed again.
package relay

import (
	"context"
	"errors"
	"fmt"
	"github.com/google/uuid"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"

	"github.com/outbox-relay/outbox-relay/internal/ident"
	"github.com/outbox-relay/outbox-relay/metrics"
)

// Deps are the relay's collaborators, all required. The caller builds them
// from the same Config (PoolConfig for the pool, package relay/rabbitmq for
// the publisher) and owns the pool: Run neither opens nor closes it, so
// close it after Run returns. The publisher is the relay's once New
// accepts it: Run connects it and closes it when it returns, after the
// last batch has settled.
type Deps struct {
	Logger    *zap.Logger
	Metrics   *metrics.Metrics
	Pool      *pgxpool.Pool
	Publisher Publisher
}

// Headers the relay adds to every message besides the row's own headers.
const (
	// HeaderSeq carries the row's sequence number (int64): consumers can check
	// per-key order with it.
	HeaderSeq = "x-outbox-seq"
	// HeaderPartitionKey carries the row's partition key, when it has one.
	HeaderPartitionKey = "x-outbox-partition-key"
)

// ErrTableMissing is returned by Run when the outbox table does not exist.
var ErrTableMissing = errors.New("outbox table does not exist")

// ErrSchemaOutdated is returned by Run when the outbox table lacks columns
// of a migration this relay needs.
var ErrSchemaOutdated = errors.New("outbox table is missing migrations")

// errNotConnected is every link's state before its first attempt.
var errNotConnected = errors.New("not connected yet")

// Relay moves committed outbox rows to the broker. Create it with New and
// run it with Run; it holds no resources until Run.
type Relay struct {
	cfg   Config
	table ident.Table
	q     queries
	log   *zap.Logger
	m     *metrics.Metrics
	pub   Publisher

	// Ordered mode only; used by the claim loop's goroutine alone.
	horizon horizon
	leases  leases
	seqName string
	held    int    // rows the last claim left unpublished above the commit horizon
	cursor  string // the key findHeads starts from

	// Ordered mode: keys whose batches settled since the last claim (the
	// settler signals each on settled), keys in flight, heads found.
	settledMu   sync.Mutex
	settledKeys []string
	settledSeqs []int64             // the dispatched row of each settled key
	settledHits int                 // heads the last claim found among settled keys
	exhausted   bool                // the last claim took every head it found
	flying      map[string]int      // keys in batches in flight
	found       map[int64]foundHead // heads the last findHeads found, by seq
	inflight    atomic.Int32        // batches sent and not yet settled

	pool *pgxpool.Pool

	// cleanerLock is the advisory lock class that lets one replica's
	// retention cleaner run at a time (taken per statement, so a replica
	// that dies mid-statement frees it).
	cleanerLock int32
	// statsOwner identifies this replica in the stats lease (stats.go).
	statsOwner string

	wake     chan string // wake-up source; capacity 1, coalescing
	lastLoop atomic.Int64
	started  atomic.Bool
	// sendFailing is set while the last settled batch lost its broker link.
	sendFailing atomic.Bool
	// inflightBytes is the payload held by batches claimed and not yet
	// settled; claims stop at relay.batch_bytes minus it. settled wakes a
	// claim waiting for room (capacity 1, coalescing).
	inflightBytes atomic.Int64
	settled       chan struct{}

	mu    sync.Mutex
	links map[string]error // nil: up
}

// New validates cfg (after applying defaults) and returns a relay.
func New(cfg Config, deps Deps) (*Relay, error) {
	if deps.Logger == nil {
		return nil, errors.New("relay: nil Logger")
	}
	if deps.Metrics == nil {
		return nil, errors.New("relay: nil Metrics")
	}
	if deps.Pool == nil {
		return nil, errors.New("relay: nil Pool (build it with pgxpool.NewWithConfig and relay.PoolConfig)")
	}
	if deps.Publisher == nil {
		return nil, errors.New("relay: nil Publisher (build it with package relay/rabbitmq)")
	}
	cfg = cfg.WithDefaults().WithAppNames()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	log := deps.Logger.Named("relay")
	r := &Relay{
		cfg:   cfg,
		table: cfg.table(),
		q:     newQueries(cfg.table(), cfg.Relay.OnDead),
		log:   log,
		m:     deps.Metrics,
		pub:   deps.Publisher,
		pool:  deps.Pool,
		wake:  make(chan string, 1),
		links: map[string]error{},

		settled: make(chan struct{}, 1),
		flying:  map[string]int{},
		found:   map[int64]foundHead{},

		cleanerLock: lockClass("cleaner " + cfg.table().String()),
	}
	r.leases = leases{
		owner:      newOwner(),
		timeout:    cfg.Relay.LeaseTimeout,
		partitions: cfg.Relay.Partitions,
		tokenClass: lockClass("member " + cfg.table().String()),
		noToken:    cfg.Postgres.Pooler == PoolerTransaction,
	}
	r.links[metrics.LinkPostgres] = errNotConnected
	r.links[metrics.LinkAMQP] = errNotConnected
	if cfg.Wake.Mode == WakeNotify {
		r.links[metrics.LinkListen] = errNotConnected
	}
	// Only the links this configuration uses get a link_up series: in poll
	// mode there is no listen link, rather than one that reads 0 forever.
	for link := range r.links {
		r.m.LinkUp.WithLabelValues(link).Set(0)
	}
	r.m.SetReadiness(r.Ready)
	r.m.Info.WithLabelValues(r.table.String(), cfg.AMQP.Exchange).Set(1)
	if cfg.Relay.Ordering == OrderingPartitionKey {
		r.m.Partitions.Set(float64(cfg.Relay.Partitions))
	}
	r.statsOwner = cfg.AMQP.ConnectionName + "/" + uuid.NewString()
	return r, nil
}

// Config returns the effective configuration (defaults applied).
func (r *Relay) Config() Config { return r.cfg }

// Run relays until ctx is cancelled, then drains: it stops claiming, waits
// up to relay.shutdown_timeout for the confirms of the batch in flight,
// commits what was confirmed and returns nil. It returns an error only for
// conditions that retrying cannot fix, such as a missing outbox table.
func (r *Relay) Run(ctx context.Context) error {
	if !r.started.CompareAndSwap(false, true) {
		return errors.New("relay: Run called twice")
	}
	pool := r.pool
	// Dedicated connections (LISTEN, the session check, the lease token)
	// are opened with the pool's own settings.
	connCfg := pool.Config().ConnConfig
	r.lastLoop.Store(time.Now().UnixNano())

	var wg sync.WaitGroup
	bg, stopBG := context.WithCancel(ctx)
	if r.cfg.Wake.Mode == WakeNotify {
		wg.Go(func() { r.listen(bg, connCfg) })
	}
	wg.Go(func() { r.statsLoop(bg, pool) })
	if *r.cfg.Retention.Enabled {
		wg.Go(func() { r.cleanLoop(bg, pool) })
	}

	r.log.Info("relay started",
		zap.String("table", r.table.String()),
		zap.String("exchange", r.cfg.AMQP.Exchange),
		zap.String("wake_mode", r.cfg.Wake.Mode),
		zap.Int("batch_size", r.cfg.Relay.BatchSize))
	err := r.claimLoop(ctx, pool, connCfg)
	if r.cfg.Relay.Ordering == OrderingPartitionKey {
		r.leases.release(ctx, r)
	}

	// Reverse order of start: claiming has stopped and its last batch is
	// settled; now the background loops and the broker. The pool is the
	// caller's.
	stopBG()
	wg.Wait()
	err = errors.Join(err, r.pub.Close())
	if err == nil {
		r.log.Info("relay stopped")
	}
	return err
}

// claimLoop runs batches until ctx is done. It keeps going while batches come
// back full, polls adaptively when idle, and backs off on errors.
func (r *Relay) claimLoop(ctx context.Context, pool *pgxpool.Pool, connCfg *pgx.ConnConfig) error {
	ordered := r.cfg.Relay.Ordering == OrderingPartitionKey
	interval := r.cfg.Wake.MinInterval
	failures := 0
	checked := false
	probe := false // the last batch was empty: probe before claiming
	var flow flowMeter
	// drain outlives ctx by relay.shutdown_timeout: at shutdown, batches
	// already sent get that long for their confirms, and are then settled.
	drain, cancelDrain := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelDrain()
	stopDrain := context.AfterFunc(ctx, func() {
		r.log.Info("stopping: no new claims; batches in flight get their confirms and commit",
			zap.Duration("shutdown_timeout", r.cfg.Relay.ShutdownTimeout))
		time.AfterFunc(r.cfg.Relay.ShutdownTimeout, cancelDrain)
	})
	defer stopDrain()
	// Pipelining: sent batches go to a settler that waits for their
	// confirms and commits their outcome in order, while this loop claims
	// and sends the next ones. Batches in flight never share a row (each
	// holds its rows' locks; claims skip locked rows) and, in ordered mode,
	// never a key (a key's head is locked until its batch commits).
	sent := make(chan *batch, r.inflightLimit()-1)
	settleErr := make(chan error, 1)
	settled := make(chan struct{})
	go func() {
		defer close(settled)
		for b := range sent {
			msgs := b.msgs // settle lets go of them
			err := r.settle(ctx, drain, b)
			r.inflightBytes.Add(-b.bytes)
			// Counted out, and its keys noted, before the signal: a claim
			// loop that sees the batch in flight gets the signal after it.
			r.inflight.Add(-1)
			if ordered {
				r.noteSettled(msgs, b.done)
			}
			select {
			case r.settled <- struct{}{}:
			default:
			}
			if err != nil {
				select {
				case settleErr <- err:
				default:
				}
			}
		}
	}()
	defer func() { close(sent); <-settled }()

	pause := func() {
		failures++
		sleep(ctx, r.reconnectDelay(failures))
	}
	// The links work again, unless the last settled batch lost the broker
	// link: connecting and claiming prove nothing then (a broker that
	// refuses every publish accepts connections), so the backoff keeps
	// growing until a batch gets through.
	linkOK := func() {
		if !r.sendFailing.Load() {
			failures = 0
		}
	}
	for ctx.Err() == nil {
		r.lastLoop.Store(time.Now().UnixNano())
		select {
		case <-settleErr: // the settler set the link state
			pause()
			continue
		default:
		}
		if !checked {
			err := r.checkSchema(ctx, pool)
			if err == nil {
				err = r.checkSession(ctx, pool, connCfg)
			}
			if err != nil {
				if errors.Is(err, ErrTableMissing) || errors.Is(err, ErrSchemaOutdated) || errors.Is(err, ErrTransactionPooler) {
					return err
				}
				r.setLink(metrics.LinkPostgres, err)
				pause()
				continue
			}
			checked = true
		}
		if r.pub.Ready() != nil {
			if err := r.pub.Connect(ctx); err != nil {
				r.setLink(metrics.LinkAMQP, err)
				pause()
				continue
			}
			r.setLink(metrics.LinkAMQP, nil)
		}
		if ordered {
			if err := r.leases.maintain(ctx, r, connCfg); err != nil {
				r.leases.lapse()
				r.horizon.reset()
				if ctx.Err() == nil {
					r.pgFailed(err)
				}
				pause()
				continue
			}
			// Only while rows are held back: a candidate left from the last
			// read ages with nothing waiting on it.
			wait := time.Duration(0)
			if r.held > 0 {
				wait = r.horizon.wait(time.Now())
			}
			r.m.HorizonWait.Set(wait.Seconds())
		}
		next, err := r.claimAndSend(ctx, drain, pool, probe)
		if err != nil {
			if ordered {
				// The error may be a restarted or failed-over server.
				r.horizon.reset()
			}
			if ctx.Err() == nil {
				pause()
			}
			continue
		}
		n := next.size() // read before the settler may release next
		flowRate := flow.add(time.Now(), n)
		if next != nil {
			// Blocks while the pipeline is full: the settler makes room
			// within amqp.confirm_timeout.
			if ordered {
				r.noteSent(next.msgs)
			}
			r.inflight.Add(1)
			sent <- next
			probe, interval = false, r.cfg.Wake.MinInterval
			linkOK()
			if ordered && r.exhausted {
				r.awaitHeads(ctx)
			}
			if r.cfg.Wake.Mode == WakePoll && !ordered && n < r.cfg.Relay.BatchSize {
				// A short batch took all that was due, so claiming again
				// at once would mostly come back empty: three round trips
				// for nothing, at every batch. Claim again after
				// min_interval instead (full batches go on at once), or
				// under a heavy flow after wake.linger, so that batches
				// grow and cost less per event. A plain sleep:
				// outbox_relay_wakeups_total counts idle turns of the loop,
				// and this is not one.
				wait := r.cfg.Wake.MinInterval
				if flowRate > float64(r.cfg.Wake.LingerAbove) {
					wait = r.cfg.Wake.Linger
				}
				sleep(ctx, wait)
			}
			continue
		}
		// Nothing was claimed: wait before looking again. In poll mode the
		// first wait after events flowed is min_interval, then it doubles.
		linkOK()
		wait := interval
		switch {
		case ordered && r.held == 0 && r.inflight.Load() > 0:
			r.awaitHeads(ctx)
			probe = false
			continue
		case ordered && r.held > 0:
			// Committed rows may wait above the commit horizon: look again
			// soon, without hammering while a long transaction holds it.
			probe = false
			wait = min(wait, 20*time.Millisecond)
			interval = min(2*interval, 20*time.Millisecond, r.cfg.Wake.PollInterval)
		case r.cfg.Wake.Mode == WakeNotify:
			probe, wait = true, r.cfg.Wake.PollInterval
		default:
			probe, interval = true, min(2*interval, r.cfg.Wake.PollInterval)
		}
		// A row too large to share relay.batch_bytes with the batches in
		// flight goes as soon as they settle.
		var settledOne <-chan struct{}
		if r.inflightBytes.Load() > 0 {
			settledOne = r.settled
		}
		r.waitWake(ctx, wait, settledOne)
	}
	return nil
}

// awaitHeads waits until a batch in flight settles: every head due is in
// a batch in flight, and walking the keys again before one settles would
// find nothing for a probe per key. A batch waits for its confirms for at
// most 3/4 of relay.lease_timeout (settle), in normal operation
// milliseconds; keys that got their first rows meanwhile are found at the
// next claim.
func (r *Relay) awaitHeads(ctx context.Context) {
	if r.inflight.Load() == 0 {
		return
	}
	// Not longer than a lease renewal period: the loop renews the leases.
	t := time.NewTimer(r.leases.renewEvery())
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-r.settled:
	case <-t.C:
	}
}

// inflightLimit is how many sent batches may await their confirms at once
// (Config.inflightLimit).
func (r *Relay) inflightLimit() int { return r.cfg.inflightLimit() }

// waitWake blocks until a wake-up signal, the interval, a batch settled
// (when settled is not nil), or ctx.
func (r *Relay) waitWake(ctx context.Context, d time.Duration, settled <-chan struct{}) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-settled:
	case src := <-r.wake:
		r.m.Wakeups.WithLabelValues(src).Inc()
	case <-t.C:
		r.m.Wakeups.WithLabelValues(metrics.WakePoll).Inc()
	}
}

// signal wakes the claim loop without blocking; wake-ups coalesce.
func (r *Relay) signal(src string) {
	select {
	case r.wake <- src:
	default:
	}
}

// sleep waits for d or until ctx is done.
func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// checkSchema fails with ErrTableMissing when the table is absent, with
// ErrSchemaOutdated when it lacks the routing columns, and warns
// when the NOTIFY trigger disagrees with wake.mode.
func (r *Relay) checkSchema(ctx context.Context, pool *pgxpool.Pool) error {
	var exists bool
	if err := pool.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL`, r.table.Quoted()).Scan(&exists); err != nil {
		return fmt.Errorf("check outbox table: %w", err)
	}
	if !exists {
		return fmt.Errorf("%w: %s (run `outbox-relay migrate up`, or check postgres.schema and postgres.table)", ErrTableMissing, r.table)
	}
	var routing int
	if err := pool.QueryRow(ctx, routingColumns, r.table.Quoted()).Scan(&routing); err != nil {
		return fmt.Errorf("check outbox columns: %w", err)
	}
	if routing != 2 {
		return fmt.Errorf("%w: %s has no routing_key and exchange columns (run `outbox-relay migrate up`)", ErrSchemaOutdated, r.table)
	}
	if r.cfg.Relay.Ordering == OrderingPartitionKey {
		if err := pool.QueryRow(ctx, `SELECT pg_get_serial_sequence($1, 'seq')`, r.table.Quoted()).Scan(&r.seqName); err != nil {
			return fmt.Errorf("find the seq sequence of %s: %w", r.table, err)
		}
	}
	var enabled bool
	if err := pool.QueryRow(ctx, r.q.notifyTrigger, r.table.Quoted(), r.table.Name+"_notify").Scan(&enabled); err != nil {
		return fmt.Errorf("check notify trigger: %w", err)
	}
	switch {
	case r.cfg.Wake.Mode == WakeNotify && !enabled:
		r.log.Warn("wake.mode is notify but the table's NOTIFY trigger is disabled: events wait for the fallback poll; run `outbox-relay notify enable`",
			zap.Duration("poll_interval", r.cfg.Wake.PollInterval))
	case r.cfg.Wake.Mode == WakePoll && enabled:
		r.log.Warn("the table's NOTIFY trigger is enabled but wake.mode is poll: producers pay for NOTIFY for nothing; run `outbox-relay notify disable`")
	}
	r.setLink(metrics.LinkPostgres, nil)
	return nil
}

// pgFailed records a database error on the postgres link; an error caused by
// the relay's own shutdown (a cancelled context) is not a link failure.
func (r *Relay) pgFailed(err error) error {
	if !errors.Is(err, context.Canceled) {
		r.setLink(metrics.LinkPostgres, err)
	}
	return err
}

// reconnectDelay is the wait before retrying a failed link: 100 ms doubling
// to 1 s, jittered. The cap is low on purpose: a dial or a probe per second
// costs nothing, and the relay claims within a second of a link's return.
func (r *Relay) reconnectDelay(failures int) time.Duration {
	return backoff(failures, 100*time.Millisecond, time.Second)
}

// backoff is the capped exponential delay before attempt n (n ≥ 1), with
// "equal jitter": uniformly in [d/2, d].
func backoff(n int, lo, hi time.Duration) time.Duration {
	d := lo
	for i := 1; i < n && d < hi; i++ {
		if d > hi/2 { // doubling would pass hi, or overflow
			d = hi
			break
		}
		d *= 2
	}
	d = min(d, hi)
	half := d / 2
	return half + rand.N(d-half+1)
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

func isUndefinedTable(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "42P01"
}
