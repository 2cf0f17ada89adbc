package main

import (
	"context"
	"crypto/rand"
	"fmt"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/shipped"
)

// rssSection runs the daemon as a subprocess against a small and a large
// pending backlog and samples its resident memory while it drains.
func (b *bench) rssSection(ctx context.Context) error {
	if _, err := b.buildRelay(ctx); err != nil {
		return err
	}
	for _, n := range []int{b.opts.rssSmall, b.opts.rssLarge} {
		d, err := b.startDrain(ctx, func() error { return b.fill(ctx, 0, n, 0) })
		if err != nil {
			return err
		}
		cons, p := d.cons, d.proc
		var maxRSS int64
		deadline := time.Now().Add(b.opts.rssTime)
		for time.Now().Before(deadline) {
			rss, _, err := memStatus(p.pid)
			if err != nil {
				break
			}
			maxRSS = max(maxRSS, rss)
			if err := sleepCtx(ctx, 20*time.Millisecond); err != nil {
				break
			}
		}
		_, hwm, _ := memStatus(p.pid)
		received := cons.count.Load()
		stopErr := p.stop()
		cons.stop()
		if err := ctx.Err(); err != nil {
			return err
		}
		if stopErr != nil {
			return stopErr
		}
		pfx := fmt.Sprintf("rss.backlog_%d", n)
		b.out.line(pfx+".max_rss", fmt.Sprintf("%.1f", float64(maxRSS)/(1<<20)), "MiB",
			fmt.Sprintf("VmRSS sampled every 20ms for %s while draining; target < 64 MB", b.opts.rssTime))
		b.out.line(pfx+".peak_rss", fmt.Sprintf("%.1f", float64(hwm)/(1<<20)), "MiB", "VmHWM at the end")
		b.out.line(pfx+".drained", fmt.Sprint(received), "events",
			fmt.Sprintf("received by the consumer during the window; backlog filled in %.1fs", d.filled.Seconds()))
	}
	return b.largePayloads(ctx)
}

// drain is a daemon started on a written backlog, with a consumer.
type drain struct {
	cons    *consumer
	proc    *proc
	filled  time.Duration // writing the backlog took
	started time.Time     // just before the daemon was started
}

// startDrain empties the outbox, writes a backlog with fill, purges the
// queue and starts a consumer and the daemon (with env added to its
// environment): the start of every memory measurement.
func (b *bench) startDrain(ctx context.Context, fill func() error, env ...string) (*drain, error) {
	if err := b.reset(ctx, false); err != nil {
		return nil, err
	}
	began := time.Now()
	if err := fill(); err != nil {
		return nil, err
	}
	d := &drain{filled: time.Since(began)}
	var err error
	if d.cons, err = b.startConsumer(nil); err != nil {
		return nil, err
	}
	d.started = time.Now()
	if d.proc, err = b.startProc(ctx, env...); err != nil {
		d.cons.stop()
		return nil, err
	}
	return d, nil
}

// largePayloads drains a backlog of large, incompressible payloads through
// the daemon run as shipped (GOMEMLIMIT, default relay.batch_bytes) and
// reports its peak RSS: memory must follow the configuration, not the data.
func (b *bench) largePayloads(ctx context.Context) error {
	root, err := moduleRoot()
	if err != nil {
		return err
	}
	mem, err := shipped.ReadMemory(root)
	if err != nil {
		return err
	}
	rows, size := b.opts.rssBigRows, b.opts.rssBigSize
	d, err := b.startDrain(ctx, func() error {
		payload := make([]byte, size)
		for i := range rows {
			_, _ = rand.Read(payload) // TOAST would compress a repeated byte to nothing
			if err := b.writeOne(ctx, b.pool, payload); err != nil {
				return fmt.Errorf("large payloads: row %d: %w", i, err)
			}
		}
		return nil
	}, "GOMEMLIMIT="+mem.GOMEMLIMIT)
	if err != nil {
		return err
	}
	cons, p := d.cons, d.proc
	defer cons.stop()
	err = waitFor(ctx, 5*time.Minute, 20*time.Millisecond, func() (bool, error) {
		return cons.count.Load() >= int64(rows), nil
	})
	took := time.Since(d.started)
	_, hwm, _ := memStatus(p.pid)
	if stopErr := p.stop(); err == nil {
		err = stopErr
	}
	if err != nil {
		return fmt.Errorf("large payloads: %d of %d received: %w", cons.count.Load(), rows, err)
	}
	b.out.line("rss.large_payloads.peak_rss", fmt.Sprintf("%.1f", float64(hwm)/(1<<20)), "MiB",
		fmt.Sprintf("VmHWM draining %d rows of %d MiB with GOMEMLIMIT=%s and default relay.batch_bytes; shipped container limit %d MiB",
			rows, size>>20, mem.GOMEMLIMIT, mem.Limit>>20))
	b.out.line("rss.large_payloads.drain_time", fmt.Sprintf("%.1f", took.Seconds()), "s", "from the daemon's start to the last delivery")
	return nil
}
