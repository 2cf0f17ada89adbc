package main

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/relay"
)

// produceResult is what one producer run achieved.
type produceResult struct {
	commits  int64
	errors   int64
	elapsed  time.Duration
	rate     float64 // commits/s
	firstErr error
}

// produce runs opts.producers connections, each committing one-event
// transactions (writeOne) for d. With rate > 0 the events are
// offered open-loop at that total rate (event i is due at start + i/rate, and
// a late event goes at once); with rate 0 every connection commits as fast as
// it can. onCommit, if set, gets each event's number and commit time.
func (b *bench) produce(ctx context.Context, d time.Duration, rate float64, onCommit func(k int64, at time.Time)) (produceResult, error) {
	var res produceResult
	pool, err := b.producerPool(ctx)
	if err != nil {
		return res, err
	}
	// Hold every producer connection before the clock starts.
	conns := make([]*pgxpool.Conn, b.opts.producers)
	defer func() {
		for _, c := range conns {
			if c != nil {
				c.Release()
			}
		}
	}()
	for i := range conns {
		if conns[i], err = pool.Acquire(ctx); err != nil {
			return res, fmt.Errorf("producer connection: %w", err)
		}
	}
	if err := b.warm(ctx, conns); err != nil {
		return res, err
	}

	var (
		next     atomic.Int64 // next event number
		commits  atomic.Int64
		failures atomic.Int64
		errOnce  sync.Once
		wg       sync.WaitGroup
	)
	start := time.Now()
	end := start.Add(d)
	var period time.Duration
	if rate > 0 {
		period = time.Duration(float64(time.Second) / rate)
	}
	for _, c := range conns {
		wg.Go(func() {
			for ctx.Err() == nil {
				k := next.Add(1) - 1
				if period > 0 {
					due := start.Add(time.Duration(k) * period)
					if !due.Before(end) {
						return
					}
					if wait := time.Until(due); wait > 0 {
						if sleepCtx(ctx, wait) != nil {
							return
						}
					}
				} else if !time.Now().Before(end) {
					return
				}
				err := b.writeOne(ctx, c, payload(k, b.opts.payload))
				at := time.Now()
				if err != nil {
					if ctx.Err() != nil {
						return
					}
					failures.Add(1)
					errOnce.Do(func() { res.firstErr = err })
					continue
				}
				commits.Add(1)
				if onCommit != nil {
					onCommit(k, at)
				}
			}
		})
	}
	wg.Wait()
	res.elapsed = time.Since(start)
	res.commits = commits.Load()
	res.errors = failures.Load()
	res.rate = float64(res.commits) / res.elapsed.Seconds()
	if err := context.Cause(ctx); err != nil {
		return res, err
	}
	return res, nil
}

// warm has every producer connection make the producers' insert
// (insertOne) and roll it back, all at once, before the clock starts. Each
// point begins with a TRUNCATE and a trigger change, which invalidate every
// backend's cached plans and relation data: without this, the 32 backends
// rebuilt them together on the first commits of the point, which then came
// 20-40 ms late and in a burst, and their wait for the relay counted in
// the p99 of a steady rate.
func (b *bench) warm(ctx context.Context, conns []*pgxpool.Conn) error {
	errs := make([]error, len(conns))
	var wg sync.WaitGroup
	for i, c := range conns {
		wg.Go(func() {
			tx, err := c.Begin(ctx)
			if err != nil {
				errs[i] = err
				return
			}
			errs[i] = b.insertOne(ctx, tx, payload(0, b.opts.payload))
			errs[i] = errors.Join(errs[i], tx.Rollback(ctx))
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("warm producer connections: %w", err)
	}
	return nil
}

// producerPool returns the producers' pool, connected once for the run.
func (b *bench) producerPool(ctx context.Context) (*pgxpool.Pool, error) {
	if b.prodPool != nil {
		return b.prodPool, nil
	}
	cfg, err := pgxpool.ParseConfig(b.opts.dsn)
	if err != nil {
		return nil, err
	}
	cfg.MaxConns = int32(b.opts.producers)
	cfg.ConnConfig.RuntimeParams["application_name"] = b.name + "_producer"
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, err
	}
	b.prodPool = pool
	b.onCleanup(func(context.Context) error { pool.Close(); return nil })
	return pool, nil
}

// wakeMode is one of the producer-rate configurations.
type wakeMode struct {
	key, desc string
	relay     bool // run a relay at all
	notify    bool // trigger enabled and wake.mode notify
	slowPoll  bool // min_interval = poll_interval = 1s: no wake-up to speak of
}

var wakeModes = []wakeMode{
	{key: "a_no_wakeup", desc: "relay with a fixed 1s poll, trigger disabled (baseline)", relay: true, slowPoll: true},
	{key: "b_poll", desc: "relay in default poll mode, trigger disabled", relay: true},
	{key: "c_notify", desc: "relay in notify mode, trigger enabled", relay: true, notify: true},
	{key: "d_no_relay", desc: "no relay, trigger disabled", relay: false},
}

// producersSection measures producer commits/s under each wake-up mode,
// alternating the order of the modes between rounds (a b c d, d c b a, …)
// so that drift in the machine's load falls on all of them alike.
func (b *bench) producersSection(ctx context.Context) error {
	rates := map[string][]float64{}
	for round := range b.opts.rounds {
		order := append([]wakeMode(nil), wakeModes...)
		if round%2 == 1 {
			for i, j := 0, len(order)-1; i < j; i, j = i+1, j-1 {
				order[i], order[j] = order[j], order[i]
			}
		}
		for _, m := range order {
			res, pendingAfter, st, err := b.produceWithRelay(ctx, m)
			if err != nil {
				return fmt.Errorf("%s: %w", m.key, err)
			}
			rates[m.key] = append(rates[m.key], res.rate)
			note := []string{fmt.Sprintf("round %d", round+1)}
			if m.relay {
				note = append(note, fmt.Sprintf("%d pending when producers stopped", pendingAfter), st.String())
			}
			if res.errors > 0 {
				note = append(note, fmt.Sprintf("%d failed: %v", res.errors, res.firstErr))
			}
			b.out.rate(fmt.Sprintf("producers.%s.round_%d", m.key, round+1), res.rate, "commits/s", note...)
		}
	}
	mean := map[string]float64{}
	for _, m := range wakeModes {
		var sum float64
		for _, r := range rates[m.key] {
			sum += r
		}
		mean[m.key] = sum / float64(len(rates[m.key]))
		b.out.rate("producers."+m.key, mean[m.key], "commits/s", m.desc)
	}
	b.out.ratio("producers.ratio_poll_to_no_wakeup", mean["b_poll"], mean["a_no_wakeup"], "b/a; target ≥ 0.90")
	b.out.ratio("producers.ratio_notify_to_no_wakeup", mean["c_notify"], mean["a_no_wakeup"], "c/a")
	b.out.ratio("producers.ratio_poll_to_no_relay", mean["b_poll"], mean["d_no_relay"], "b/d")
	b.out.ratio("producers.ratio_no_wakeup_to_no_relay", mean["a_no_wakeup"], mean["d_no_relay"], "a/d: what draining itself costs producers")
	return nil
}

// produceWithRelay runs the closed-loop producers for opts.prodTime with the
// relay configured as m says, and reports how many rows were still pending
// when the producers stopped.
func (b *bench) produceWithRelay(ctx context.Context, m wakeMode) (produceResult, int64, batchStats, error) {
	var (
		res produceResult
		st  batchStats
	)
	if err := b.reset(ctx, m.notify); err != nil {
		return res, 0, st, err
	}
	cons, err := b.startConsumer(nil)
	if err != nil {
		return res, 0, st, err
	}
	defer cons.stop()
	var r *inproc
	if m.relay {
		cfg := b.relayConfig()
		switch {
		case m.notify:
			cfg.Wake.Mode = relay.WakeNotify
		case m.slowPoll:
			cfg.Wake.MinInterval, cfg.Wake.PollInterval = time.Second, time.Second
		}
		if r, err = b.startRelay(ctx, cfg); err != nil {
			return res, 0, st, err
		}
		defer r.stop()
	}
	res, err = b.produce(ctx, b.opts.prodTime, 0, nil)
	if err != nil {
		return res, 0, st, err
	}
	var pendingAfter int64
	if r != nil {
		if pendingAfter, err = b.pending(ctx); err != nil {
			return res, 0, st, err
		}
		if err := r.stop(); err != nil {
			return res, 0, st, err
		}
		st = r.batchStats()
	}
	return res, pendingAfter, st, nil
}

// idleSection measures what an idle relay costs: the daemon runs as a
// subprocess with nothing written; its wake-ups come from its metrics, its
// CPU and that of its database backends from /proc.
func (b *bench) idleSection(ctx context.Context) error {
	modes := []bool{false, true}
	if b.opts.quick {
		modes = modes[:1]
	}
	for _, notify := range modes {
		mode := relay.WakePoll
		if notify {
			mode = relay.WakeNotify
		}
		if err := b.reset(ctx, notify); err != nil {
			return err
		}
		p, err := b.startProc(ctx, "OUTBOX_RELAY_WAKE_MODE="+mode)
		if err != nil {
			return err
		}
		// Let the poll interval back off to its idle value (2ms doubling
		// to 100ms takes about 130ms).
		if err := sleepCtx(ctx, 500*time.Millisecond); err != nil {
			return err
		}
		pids, err := b.backendPIDs(ctx, p.appName)
		if err != nil {
			return err
		}
		s0, err := sampleIdle(p, pids)
		if err != nil {
			return err
		}
		t0 := time.Now()
		if err := sleepCtx(ctx, b.opts.idleTime); err != nil {
			return err
		}
		s1, err := sampleIdle(p, pids)
		if err != nil {
			return err
		}
		el := time.Since(t0)
		if err := p.stop(); err != nil {
			return err
		}
		pfx := "idle." + mode
		b.out.line(pfx+".wakeups", fmt.Sprintf("%.1f", (s1.wakeups-s0.wakeups)/el.Seconds()), "per s",
			"claim-loop wake-ups (outbox_relay_wakeups_total); each idle one is one probe query, plus one stats query per relay.stats_interval (5s)")
		b.out.line(pfx+".relay_cpu", fmt.Sprintf("%.2f", 100*(s1.cpu-s0.cpu).Seconds()/el.Seconds()), "% of one core",
			"outbox-relay process, all threads, from /proc/PID/task/*/schedstat")
		if s0.pg >= 0 && s1.pg >= 0 {
			b.out.line(pfx+".postgres_cpu", fmt.Sprintf("%.2f", 100*(s1.pg-s0.pg).Seconds()/el.Seconds()), "% of one core",
				fmt.Sprintf("the relay's %d database backends", len(pids)))
		} else {
			b.out.line(pfx+".postgres_cpu", "n/a", "", "database backends not visible in /proc")
		}
	}
	return nil
}

// idleSample is what idleSection reads at each end of its quiet time.
type idleSample struct {
	wakeups float64       // outbox_relay_wakeups_total, all sources
	cpu     time.Duration // the relay process
	pg      time.Duration // its database backends, negative if not visible
}

func sampleIdle(p *proc, pids []int) (idleSample, error) {
	var s idleSample
	var err error
	if s.wakeups, err = p.scrape("outbox_relay_wakeups_total"); err != nil {
		return s, err
	}
	if s.cpu, err = cpuTime(p.pid); err != nil {
		return s, err
	}
	s.pg = backendsCPU(pids)
	return s, nil
}

// backendPIDs lists the server processes serving connections with the
// given application_name.
func (b *bench) backendPIDs(ctx context.Context, appName string) ([]int, error) {
	rows, err := b.pool.Query(ctx, `SELECT pid FROM pg_stat_activity WHERE application_name = $1`, appName)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var pids []int
	for rows.Next() {
		var pid int
		if err := rows.Scan(&pid); err != nil {
			return nil, err
		}
		pids = append(pids, pid)
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	if len(pids) == 0 {
		return nil, errors.New("no database connection of the relay found in pg_stat_activity")
	}
	return pids, nil
}

// backendsCPU sums the CPU time of pids; -1 if any is unreadable.
func backendsCPU(pids []int) time.Duration {
	var sum time.Duration
	for _, pid := range pids {
		t, err := cpuTime(pid)
		if err != nil {
			return -1
		}
		sum += t
	}
	return sum
}
