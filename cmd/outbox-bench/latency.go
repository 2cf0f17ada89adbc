package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/outbox-relay/outbox-relay/relay"
)

type latencyPoint struct {
	name   string
	rate   float64
	notify bool
	note   string
}

// latencySection measures commit→receive latency with plain-SQL producers
// offering one event per transaction at fixed rates: the absolute
// rates and fractions of the drain capacity in default poll mode, and
// notify mode at the first absolute rate and at half capacity.
func (b *bench) latencySection(ctx context.Context) error {
	if b.capacity == 0 {
		// Without the drain section, measure capacity with a short drain.
		n := min(b.opts.backlog, 20_000)
		res, err := b.drain(ctx, n, relay.OnDispatchMark)
		if err != nil {
			return fmt.Errorf("capacity: %w", err)
		}
		b.capacity = res.rate
		b.out.rate("latency.capacity", res.rate, "events/s", fmt.Sprintf("drain of %d events, as the drain section was not run", n))
	}
	var points []latencyPoint
	for _, r := range b.opts.rates {
		points = append(points, latencyPoint{name: fmt.Sprintf("poll.rate_%d", r), rate: float64(r)})
	}
	for _, f := range b.opts.fractions {
		points = append(points, latencyPoint{name: fmt.Sprintf("poll.capacity_%dpct", f), rate: b.capacity * float64(f) / 100,
			note: fmt.Sprintf("%d%% of the drain capacity", f)})
	}
	if len(b.opts.rates) > 0 {
		r := b.opts.rates[0]
		points = append(points, latencyPoint{name: fmt.Sprintf("notify.rate_%d", r), rate: float64(r), notify: true})
	}
	if !b.opts.quick {
		points = append(points, latencyPoint{name: "notify.capacity_50pct", rate: b.capacity / 2, notify: true,
			note: "50% of the drain capacity"})
	}
	for _, p := range points {
		if err := b.latencyPoint(ctx, p); err != nil {
			return fmt.Errorf("%s: %w", p.name, err)
		}
	}
	return nil
}

func (b *bench) latencyPoint(ctx context.Context, p latencyPoint) error {
	if err := b.reset(ctx, p.notify); err != nil {
		return err
	}
	// Event numbers are dense from 0, so both times live in slices.
	maxEvents := int(p.rate*b.opts.latTime.Seconds()) + 1
	commits := make([]int64, maxEvents)
	recv := make([]int64, maxEvents)
	cons, err := b.startConsumer(recv)
	if err != nil {
		return err
	}
	defer cons.stop()
	r, err := b.startLatencyRelay(ctx, p.notify)
	if err != nil {
		return err
	}
	defer r.stop()
	// Start from an idle relay, polling at its idle interval.
	if err := sleepCtx(ctx, 200*time.Millisecond); err != nil {
		return err
	}
	res, err := b.produce(ctx, b.opts.latTime, p.rate, func(k int64, at time.Time) {
		if k < int64(len(commits)) {
			commits[k] = at.UnixNano()
		}
	})
	if err != nil {
		return err
	}
	pendingAfter, err := b.pending(ctx)
	if err != nil {
		return err
	}
	waitErr := cons.waitCount(ctx, res.commits, 15*time.Second)
	st := r.batchStats() // before stop: the daemon's metrics go with it
	if err := r.stop(); err != nil {
		return err
	}
	cons.stop()
	where := "relay: the daemon, a process of its own"
	if b.opts.latInproc {
		where = "relay: in the bench process (-latency-inproc)"
	}

	if b.opts.latDump != "" {
		if err := dumpTimes(filepath.Join(b.opts.latDump, p.name+".txt"), commits, recv); err != nil {
			return err
		}
	}
	lat := splitWake(commits, recv)
	pfx := "latency." + p.name
	achieved := fmt.Sprintf("offered %.0f/s, achieved %.0f/s", p.rate, res.rate)
	if res.rate < 0.97*p.rate {
		achieved += " (NOT achieved: the producer connections could not commit faster)"
	}
	notes := []string{achieved, where}
	if p.note != "" {
		notes = append(notes, p.note)
	}
	if res.errors > 0 {
		notes = append(notes, fmt.Sprintf("%d failed: %v", res.errors, res.firstErr))
	}
	b.out.rate(pfx+".offered", p.rate, "events/s", notes...)
	b.out.rate(pfx+".achieved", res.rate, "events/s",
		fmt.Sprintf("%d events committed, %d pending when producers stopped", res.commits, pendingAfter), st.String())
	for _, q := range []struct {
		name string
		p    float64
	}{{"p50", 50}, {"p95", 95}, {"p99", 99}, {"max", 100}} {
		b.out.line(pfx+"."+q.name, ms(percentile(lat.flow, q.p)), "ms")
	}
	wake := "in poll mode at most wake.poll_interval (the relay starts idle); not in the percentiles above"
	if p.notify {
		wake = "the relay starts idle, woken by NOTIFY; not in the percentiles above"
	}
	b.out.line(pfx+".wake_from_idle", ms(lat.wake), "ms",
		fmt.Sprintf("the first event's wait; %d events committed before the first one arrived", lat.woken), wake)
	b.out.line(pfx+".p99_with_wake", ms(percentile(lat.all, 99)), "ms", "over every event, the wake-up's included")
	if lat.missing > 0 || waitErr != nil {
		b.out.line(pfx+".missing", fmt.Sprint(lat.missing), "events", "committed but not received within 15s")
	}
	return nil
}

// dumpTimes writes each committed event's commit and receive times, Unix
// ns, one line per event in the order of their numbers.
func dumpTimes(path string, commits, recv []int64) error {
	var sb strings.Builder
	for k, c := range commits {
		if c != 0 {
			fmt.Fprintf(&sb, "%d %d\n", c, recv[k])
		}
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return os.WriteFile(path, []byte(sb.String()), 0o644)
}

// latencies are a latency point's commit→receive times.
type latencies struct {
	// flow are the sorted latencies of the events committed once the
	// first event had arrived: the relay was awake and claiming.
	flow []time.Duration
	// all are every event's, sorted.
	all []time.Duration
	// wake is the first committed event's: the idle relay's wake-up.
	wake time.Duration
	// woken counts the events committed before the first arrived, which
	// waited for the wake-up.
	woken   int
	missing int // committed, never received
}

// splitWake turns commit and receive times (UnixNano by event number, 0
// for none) into latencies. The relay of a point starts idle: in poll mode
// its next probe may be up to wake.poll_interval away, and every event
// committed before it waits for it. How many do is the probe's phase, luck:
// at 1,000/s, anywhere from 0 to 2% of a 5 s point, so a p99 over all
// events reads either the flow's or the wake-up's. The events committed
// before the first event arrived are the wake-up's; the rest, the flow's.
func splitWake(commits, recv []int64) latencies {
	var l latencies
	first, firstCommit := int64(0), int64(0)
	for k, c := range commits {
		if c == 0 {
			continue
		}
		if recv[k] == 0 {
			l.missing++
			continue
		}
		if first == 0 || recv[k] < first {
			first = recv[k]
		}
		if firstCommit == 0 || c < firstCommit {
			firstCommit, l.wake = c, time.Duration(recv[k]-c)
		}
	}
	for k, c := range commits {
		if c == 0 || recv[k] == 0 {
			continue
		}
		d := time.Duration(recv[k] - c)
		l.all = append(l.all, d)
		if c < first {
			l.woken++
		} else {
			l.flow = append(l.flow, d)
		}
	}
	sortDurations(l.flow)
	sortDurations(l.all)
	return l
}

// latencyRelay is the relay of a latency point: by default the daemon in a
// process of its own, as it runs beside an application; with
// -latency-inproc the engine inside the bench process, where it shares the
// Go scheduler with the 32 producers and the consumer.
type latencyRelay interface {
	stop() error
	batchStats() batchStats
}

type daemon struct{ *proc }

func (d daemon) batchStats() batchStats { return statsOf(d.proc) }

func (b *bench) startLatencyRelay(ctx context.Context, notify bool) (latencyRelay, error) {
	if b.opts.latInproc {
		cfg := b.relayConfig()
		if notify {
			cfg.Wake.Mode = relay.WakeNotify
		}
		return b.startRelay(ctx, cfg)
	}
	mode := relay.WakePoll
	if notify {
		mode = relay.WakeNotify
	}
	p, err := b.startProc(ctx, "OUTBOX_RELAY_WAKE_MODE="+mode)
	if err != nil {
		return nil, err
	}
	return daemon{p}, nil
}
