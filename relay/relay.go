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
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
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

// Relay moves committed outbox rows to the broker. Create it with New and
// run it with Run; it holds no resources until Run.
type Relay struct {
	cfg   Config
	table ident.Table
	q     queries
	log   *zap.Logger
	m     *metrics.Metrics
	pub   Publisher

	// ord is ordered mode's state; nil unless relay.ordering is partition_key.
	ord *ordered
	// floor is where unordered claims start (floor.go).
	floor claimFloor

	inflight atomic.Int32 // batches sent and not yet settled

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
	// recheck is set when a claim or a settle failed on a missing table or
	// privilege (schemaFailure): the claim loop runs its start-up checks
	// again, which stop Run if the schema or the grants changed.
	recheck atomic.Bool
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
	// Batches in flight each hold a connection (inflightLimit): a smaller
	// pool than postgres.max_conns would leave the loop waiting for one.
	if n := deps.Pool.Config().MaxConns; n < cfg.Postgres.MaxConns {
		return nil, fmt.Errorf("relay: the pool has %d connections, fewer than postgres.max_conns (%d): build it with relay.PoolConfig", n, cfg.Postgres.MaxConns)
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

		cleanerLock: lockClass("cleaner " + cfg.table().String()),
	}
	if cfg.Relay.Ordering == OrderingPartitionKey {
		r.ord = newOrdered(&r.q, r.table.Quoted(), cfg.Relay.BatchSize, cfg.Relay.Partitions, leases{
			q:          &r.q,
			log:        log,
			gauge:      deps.Metrics.PartitionsOwned,
			owner:      newOwner(),
			timeout:    cfg.Relay.LeaseTimeout,
			partitions: cfg.Relay.Partitions,
			tokenClass: lockClass("member " + cfg.table().String()),
			noToken:    cfg.Postgres.Pooler == PoolerTransaction,
		})
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
// up to relay.shutdown_timeout for the confirms of the batches in flight,
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

	stopServices := startServices(ctx, r.services(pool, connCfg))

	r.log.Info("relay started",
		zap.String("table", r.table.String()),
		zap.String("exchange", r.cfg.AMQP.Exchange),
		zap.String("wake_mode", r.cfg.Wake.Mode),
		zap.Int("batch_size", r.cfg.Relay.BatchSize))
	err := r.claimLoop(ctx, pool, connCfg)
	if r.cfg.Relay.Ordering == OrderingPartitionKey {
		r.ord.leases.release(ctx, pool)
	}

	// Reverse order of start: claiming has stopped and its last batch is
	// settled; now the background loops and the broker. The pool is the
	// caller's.
	stopServices()
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
		r.settler(ctx, drain, sent, settleErr)
	}()
	defer func() { close(sent); <-settled }()

	pause := func() {
		failures++
		sleep(ctx, reconnectDelay(failures))
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
		if !checked || r.recheck.Swap(false) {
			checked = false // until the checks pass again
			err := r.checkSchema(ctx, pool)
			if err == nil {
				err = r.checkSession(ctx, pool, connCfg)
			}
			if err != nil {
				if errors.Is(err, ErrTableMissing) || errors.Is(err, ErrSchemaOutdated) || errors.Is(err, ErrPrivilegeMissing) || errors.Is(err, ErrTransactionPooler) {
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
			if err := r.ord.leases.maintain(ctx, pool, connCfg); err != nil {
				r.ord.leases.lapse()
				r.ord.horizon.reset()
				if ctx.Err() == nil {
					r.pgFailed(err)
				}
				pause()
				continue
			}
			// Only while rows are held back: a candidate left from the last
			// read ages with nothing waiting on it.
			wait := time.Duration(0)
			if r.ord.held > 0 {
				wait = r.ord.horizon.wait(time.Now())
			}
			r.m.HorizonWait.Set(wait.Seconds())
		}
		next, err := r.claimAndSend(ctx, drain, pool, probe)
		if err != nil {
			if schemaFailure(err) {
				r.recheck.Store(true) // the checks name the table or grant, and stop Run
			}
			if ordered {
				// The error may be a restarted or failed-over server.
				r.ord.horizon.reset()
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
				r.ord.noteSent(next.msgs)
			}
			r.inflight.Add(1)
			sent <- next
			probe, interval = false, r.cfg.Wake.MinInterval
			linkOK()
			if ordered && r.ord.exhausted {
				r.awaitHeads(ctx)
			}
			if r.cfg.Wake.Mode == WakePoll && !ordered && n < r.cfg.Relay.BatchSize {
				// A short batch took all that was due: claiming again at
				// once would mostly come back empty. Under a heavy flow,
				// wait longer (wake.linger) so batches grow. Not counted
				// as a wake-up: the loop is not idle.
				wait := r.cfg.Wake.MinInterval
				if flowRate > float64(r.cfg.Wake.LingerAbove) {
					wait = r.cfg.Wake.Linger
				}
				sleep(ctx, wait)
			}
			continue
		}
		// Nothing was claimed: wait before looking again. In poll mode the
		// first wait after events flowed is min_interval, then it doubles
		// (see pollBackoff).
		linkOK()
		wait := interval
		switch {
		case ordered && r.ord.held == 0 && r.inflight.Load() > 0:
			r.awaitHeads(ctx)
			probe = false
			continue
		case ordered && r.ord.held > 0:
			// Committed rows may wait above the commit horizon: look again
			// soon, without hammering while a long transaction holds it.
			probe = false
			wait = min(wait, 20*time.Millisecond)
			interval = min(2*interval, 20*time.Millisecond, r.cfg.Wake.PollInterval)
		case r.cfg.Wake.Mode == WakeNotify:
			probe, wait = true, r.cfg.Wake.PollInterval
		default:
			probe, interval = true, pollBackoff(interval, flowRate, r.cfg.Wake)
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
	t := time.NewTimer(r.ord.leases.renewEvery())
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
