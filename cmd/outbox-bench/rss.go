package main

import (
	"context"
	"fmt"
	"time"
)

// rssSection runs the daemon as a subprocess against a small and a large
// pending backlog and samples its resident memory while it drains.
func (b *bench) rssSection(ctx context.Context) error {
	if _, err := b.buildRelay(ctx); err != nil {
		return err
	}
	for _, n := range []int{b.opts.rssSmall, b.opts.rssLarge} {
		if err := b.reset(ctx, false); err != nil {
			return err
		}
		fillStart := time.Now()
		if err := b.fill(ctx, 0, n); err != nil {
			return err
		}
		fillTime := time.Since(fillStart)
		if err := b.purge(); err != nil {
			return err
		}
		cons, err := b.startConsumer(nil)
		if err != nil {
			return err
		}
		p, err := b.startProc(ctx)
		if err != nil {
			cons.stop()
			return err
		}
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
			fmt.Sprintf("received by the consumer during the window; backlog filled in %.1fs", fillTime.Seconds()))
	}
	return nil
}
