package main

import (
	"cmp"
	"context"
	"fmt"
	"os"
	"runtime/pprof"
	"sync"
	"time"

	"github.com/outbox-relay/outbox-relay/relay"
)

type drainResult struct {
	n        int
	elapsed  time.Duration
	rate     float64
	walBytes float64

	batches                 uint64
	meanBatch               float64
	claim, publish, mark    time.Duration // mean per batch
	claimT, publishT, markT time.Duration // total

	cpu0, cpu1 cpuSnap
	backends   time.Duration      // CPU of the engine's database backends, -1 if unknown
	idle       []brokerTickSample // the broker per brokerTick, nil if unknown
}

// drainSection pre-fills a backlog and times the relay emptying it, with
// on_dispatch: mark (the default) and, unless disabled, delete.
func (b *bench) drainSection(ctx context.Context) error {
	modes := []string{relay.OnDispatchMark}
	if b.opts.delete {
		modes = append(modes, relay.OnDispatchDelete)
	}
	for _, mode := range modes {
		if b.opts.drainAlt.text != "" {
			if err := b.drainAB(ctx, mode); err != nil {
				return fmt.Errorf("on_dispatch %s: %w", mode, err)
			}
			continue
		}
		d, err := b.drainBetweenCeilings(ctx, mode, nil)
		if err != nil {
			return fmt.Errorf("on_dispatch %s: %w", mode, err)
		}
		res, ceil := d.res, d.ceiling()
		p := "drain." + mode
		b.out.rate(p+".rate", res.rate, "events/s",
			fmt.Sprintf("%d events in %.2fs, until the consumer had all and 0 were pending", res.n, res.elapsed.Seconds()))
		b.out.rate(p+".ceiling_adjacent", ceil.rate, "msg/s",
			fmt.Sprintf("window %d, %s just before (%.0f/s) and just after (%.0f/s) this drain: the higher", d.window, d.span, d.before.rate, d.after.rate))
		b.out.ratio(p+".ratio_to_ceiling_adjacent", res.rate, ceil.rate, "target ≥ 0.90")
		if b.ceiling > 0 {
			b.out.ratio(p+".ratio_to_ceiling", res.rate, b.ceiling, "to broker.ceiling; target ≥ 0.90")
		}
		b.out.line(p+".wal_per_event", fmt.Sprintf("%.0f", res.walBytes/float64(res.n)), "bytes",
			"cluster-wide WAL during the drain (after a CHECKPOINT, so full-page images included) / events")
		b.cpuLine(p+".cpu", res.cpu0, res.cpu1, res.backends)
		b.perEventLines(p, res, ceil)
		b.out.line(p+".batches", fmt.Sprint(res.batches), "", fmt.Sprintf("mean %.0f rows", res.meanBatch))
		b.out.line(p+".stage_claim", ms(res.claim), "ms", fmt.Sprintf("mean per claim; summed: %.0f%% of the drain's wall time", pct(res.claimT, res.elapsed)))
		b.out.line(p+".stage_publish", ms(res.publish), "ms", fmt.Sprintf("mean per batch, first publish to last confirm; summed: %.0f%%", pct(res.publishT, res.elapsed)))
		b.out.line(p+".stage_mark", ms(res.mark), "ms", fmt.Sprintf("mean per batch, mark and commit; summed: %.0f%% (pipelined batches overlap, so the sums may exceed 100%%)", pct(res.markT, res.elapsed)))
		if mode == relay.OnDispatchMark {
			b.capacity = res.rate
		}
	}
	return nil
}

// adjacentDrain is a drain measured between two short ceiling runs.
type adjacentDrain struct {
	res           drainResult
	before, after publishResult
	window        int           // the ceiling runs' confirm window
	span          time.Duration // each ceiling run's length
}

// ceiling is the higher of the two ceiling runs, the one the drain is
// compared with.
func (d adjacentDrain) ceiling() publishResult {
	if d.after.rate > d.before.rate {
		return d.after
	}
	return d.before
}

// drainBetweenCeilings drains a backlog (tweak, if set, changes the relay's
// configuration) between two ceiling runs: the machine's load drifts, so
// the ceiling is measured again just before and just after each drain,
// with the best window (or the relay's amqp.max_unconfirmed).
func (b *bench) drainBetweenCeilings(ctx context.Context, mode string, tweak func(*relay.Config)) (adjacentDrain, error) {
	d := adjacentDrain{window: cmp.Or(b.ceilingWindow, relayMaxUnconfirmed()), span: min(b.opts.ceilTime, 2*time.Second)}
	var err error
	if d.before, err = b.publishRun(ctx, d.window, d.span); err != nil {
		return d, fmt.Errorf("ceiling before: %w", err)
	}
	if d.res, err = b.drainWith(ctx, b.opts.backlog, mode, tweak); err != nil {
		return d, err
	}
	if d.after, err = b.publishRun(ctx, d.window, d.span); err != nil {
		return d, fmt.Errorf("ceiling after: %w", err)
	}
	return d, nil
}

func pct(part, whole time.Duration) float64 {
	if whole <= 0 {
		return 0
	}
	return 100 * part.Seconds() / whole.Seconds()
}

// drain fills n events, then runs the in-process relay (default poll mode,
// the given on_dispatch) until a consumer has received all n and the table
// has none pending.
func (b *bench) drain(ctx context.Context, n int, onDispatch string) (drainResult, error) {
	return b.drainWith(ctx, n, onDispatch, nil)
}

// drainWith is drain with the relay's configuration changed by tweak, if set.
func (b *bench) drainWith(ctx context.Context, n int, onDispatch string, tweak func(*relay.Config)) (drainResult, error) {
	res := drainResult{n: n}
	if err := b.reset(ctx, false); err != nil {
		return res, err
	}
	if err := b.fill(ctx, 0, n, 0); err != nil {
		return res, err
	}
	// A checkpoint now makes the WAL figure repeatable: every page the
	// drain touches writes one full-page image, as after any checkpoint.
	if _, err := b.pool.Exec(ctx, "CHECKPOINT"); err != nil {
		return res, fmt.Errorf("checkpoint: %w", err)
	}
	cons, err := b.startConsumer(nil)
	if err != nil {
		return res, err
	}
	defer cons.stop()
	lsn0, err := b.walLSN(ctx)
	if err != nil {
		return res, err
	}
	cfg := b.relayConfig()
	cfg.Relay.OnDispatch = onDispatch
	if tweak != nil {
		tweak(&cfg)
	}
	stopProfile, err := b.profileDrain(onDispatch)
	if err != nil {
		return res, err
	}
	defer stopProfile()
	res.cpu0 = b.cpuSnapshot()
	idle := b.sampleBroker()
	defer idle.finish()
	start := time.Now()
	r, err := b.startRelay(ctx, cfg)
	if err != nil {
		return res, err
	}
	defer r.stop()
	limit := time.Minute + time.Duration(n)*time.Millisecond // ≥ 1,000 events/s or give up
	if err := cons.waitCount(ctx, int64(n), limit); err != nil {
		return res, err
	}
	err = waitFor(ctx, 30*time.Second, 5*time.Millisecond, func() (bool, error) {
		p, err := b.pending(ctx)
		return p == 0, err
	})
	if err != nil {
		return res, fmt.Errorf("pending rows after the consumer had all: %w", err)
	}
	res.elapsed = time.Since(start)
	res.cpu1 = b.cpuSnapshot()
	stopProfile()
	res.idle = idle.finish()
	// The engine's backends started with it: their whole CPU time is the drain's.
	res.backends = -1
	if pids, err := b.backendPIDs(ctx, b.engineAppName()); err == nil {
		res.backends = backendsCPU(pids)
	}
	lsn1, err := b.walLSN(ctx)
	if err != nil {
		return res, err
	}
	if res.walBytes, err = b.walDiff(ctx, lsn0, lsn1); err != nil {
		return res, err
	}
	res.rate = float64(n) / res.elapsed.Seconds()
	if got := cons.count.Load(); got != int64(n) {
		// More than n means duplicates (at-least-once): worth seeing.
		b.out.line(fmt.Sprintf("drain.%s.received", onDispatch), fmt.Sprint(got), "messages", fmt.Sprintf("expected %d", n))
	}
	if err := r.stop(); err != nil {
		return res, err
	}

	st := r.batchStats()
	res.batches, res.meanBatch = st.batches, st.meanBatch
	res.claim, res.publish, res.mark = st.claim, st.publish, st.mark
	res.claimT, res.publishT, res.markT = st.claimT, st.publishT, st.markT
	return res, nil
}

// profileDrain starts a CPU profile of the bench process for one drain
// (-cpuprofile), written to the path with the drain's number and mode
// appended; the returned stop ends it and may be called more than once.
func (b *bench) profileDrain(mode string) (stop func(), err error) {
	b.drains++
	if b.opts.cpuProf == "" {
		return func() {}, nil
	}
	f, err := os.Create(fmt.Sprintf("%s.%d.%s", b.opts.cpuProf, b.drains, mode))
	if err != nil {
		return nil, fmt.Errorf("-cpuprofile: %w", err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, fmt.Errorf("-cpuprofile: %w", err)
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			pprof.StopCPUProfile()
			f.Close()
		})
	}, nil
}
