package main

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// brokerTick is the broker sampler's interval: short enough to see the gaps
// between the relay's batches (a batch of 500 takes ~40 ms at the ceiling),
// long enough that reading ~20 threads' schedstat costs nothing measurable.
const brokerTick = 20 * time.Millisecond

// idleSampler reads the broker's CPU every brokerTick while a measurement
// runs: per tick, the time its threads ran and the time they waited for a
// CPU (run-queue time), from schedstat, each in cores.
type idleSampler struct {
	pid   int
	stop  chan struct{}
	done  chan struct{}
	ticks []brokerTickSample
	once  sync.Once
}

type brokerTickSample struct{ run, wait float64 }

// sampleBroker starts sampling the broker; nil when the broker's process is
// not visible (then finish reports nothing).
func (b *bench) sampleBroker() *idleSampler {
	if b.brokerPID <= 0 {
		return nil
	}
	if _, _, err := schedBusy(b.brokerPID); err != nil {
		return nil
	}
	s := &idleSampler{pid: b.brokerPID, stop: make(chan struct{}), done: make(chan struct{})}
	go s.loop()
	return s
}

func (s *idleSampler) loop() {
	defer close(s.done)
	t := time.NewTicker(brokerTick)
	defer t.Stop()
	lastRun, lastWait, _ := schedBusy(s.pid)
	lastAt := time.Now()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
		}
		run, wait, err := schedBusy(s.pid)
		now := time.Now()
		if err != nil {
			continue
		}
		// A tick that came late (the bench itself waited for a CPU) still
		// measures one interval: the broker's time over the real elapsed.
		if el := float64(now.Sub(lastAt)); el > 0 {
			s.ticks = append(s.ticks, brokerTickSample{run: float64(run-lastRun) / el, wait: float64(wait-lastWait) / el})
		}
		lastRun, lastWait, lastAt = run, wait, now
	}
}

// finish stops sampling and returns the per-tick samples, nil when there
// was nothing to sample. It may be called again (deferred, for the error
// paths).
func (s *idleSampler) finish() []brokerTickSample {
	if s == nil {
		return nil
	}
	s.once.Do(func() { close(s.stop) })
	<-s.done
	return s.ticks
}

// brokerIdleBelow is the share of the ceiling's mean run under which a
// tick of the drain counts as idle: the broker did less than half of what
// it does when a bare publisher keeps it fed.
const brokerIdleBelow = 0.5

// means returns the mean run and run-queue wait over ticks, in cores.
func means(ticks []brokerTickSample) (run, wait float64) {
	for _, t := range ticks {
		run += t.run
		wait += t.wait
	}
	n := float64(max(len(ticks), 1))
	return run / n, wait / n
}

// idleShare returns the share of ticks under brokerIdleBelow of ref cores.
func idleShare(ticks []brokerTickSample, ref float64) float64 {
	n := 0
	for _, t := range ticks {
		if t.run < brokerIdleBelow*ref {
			n++
		}
	}
	return float64(n) / float64(max(len(ticks), 1))
}

// schedBusy returns the time pid's threads ran and the time they waited on
// a run queue (the first two fields of /proc/PID/task/*/schedstat).
func schedBusy(pid int) (run, wait time.Duration, err error) {
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return 0, 0, err
	}
	var sum [2]int64
	for _, t := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/schedstat", pid, t.Name()))
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				continue // the thread ended
			}
			return 0, 0, err
		}
		f := strings.Fields(string(b))
		if len(f) < 2 {
			return 0, 0, errors.New("malformed schedstat")
		}
		for i, v := range f[:2] {
			ns, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				return 0, 0, fmt.Errorf("schedstat: %w", err)
			}
			sum[i] += ns
		}
	}
	return time.Duration(sum[0]), time.Duration(sum[1]), nil
}

// cpuBoundRatio is the ceiling run's CPU per message (the bench process
// and the broker) over the drain's per event (the bench process, the
// relay's database backends and the broker). When both runs keep every
// core busy, rate × CPU per event is the same for both, and this is the
// ratio the drain can reach; the relay's extra database work is what keeps
// it under 1 unless the engine costs less than a bare publisher. false
// when a figure is missing.
func cpuBoundRatio(d drainResult, c publishResult) (float64, bool) {
	if d.n <= 0 || c.n <= 0 || d.backends < 0 {
		return 0, false
	}
	drain := (d.cpu1.self - d.cpu0.self + d.backends + d.cpu1.broker - d.cpu0.broker).Seconds() / float64(d.n)
	ceil := (c.cpu1.self - c.cpu0.self + c.cpu1.broker - c.cpu0.broker).Seconds() / float64(c.n)
	if drain <= 0 || ceil <= 0 {
		return 0, false
	}
	return ceil / drain, true
}

// perEventLines prints the CPU each process spent per event of a drain,
// beside the same figures per message of the ceiling run next to it, and
// the share of the drain during which the broker was idle.
func (b *bench) perEventLines(p string, d drainResult, c publishResult) {
	per := func(t time.Duration, n float64) string {
		if n <= 0 || t < 0 {
			return "n/a"
		}
		return fmt.Sprintf("%.1f", float64(t.Microseconds())/n)
	}
	dn, cn := float64(d.n), float64(c.n)
	b.out.line(p+".cpu_per_event.relay", per(d.cpu1.self-d.cpu0.self, dn), "µs",
		"the bench process: relay engine and consumer; ceiling beside it (publisher and consumer): "+per(c.cpu1.self-c.cpu0.self, cn)+" µs")
	b.out.line(p+".cpu_per_event.postgres", per(d.backends, dn), "µs", "the relay's database backends")
	if b.brokerPID > 0 {
		b.out.line(p+".cpu_per_event.broker", per(d.cpu1.broker-d.cpu0.broker, dn), "µs",
			"ceiling beside it: "+per(c.cpu1.broker-c.cpu0.broker, cn)+" µs")
		if ratio, ok := cpuBoundRatio(d, c); ok {
			b.out.line(p+".ratio_cpu_bound", fmt.Sprintf("%.2f", ratio), "",
				"the ceiling's CPU per message (publisher, consumer, broker) / the drain's per event (relay engine, consumer, its database backends, broker): "+
					"the ratio to the ceiling when both keep the cores busy (drain.*.cpu), as their rates then go as 1 / CPU per event")
		}
	}
	if len(d.idle) == 0 || len(c.idle) == 0 {
		return
	}
	ref, refWait := means(c.idle)
	run, wait := means(d.idle)
	b.out.line(p+".broker_run", fmt.Sprintf("%.2f", run), "cores",
		fmt.Sprintf("mean over %s ticks; ceiling beside it: %.2f; waiting for a CPU (threads summed, the machine's load): %.2f, ceiling %.2f",
			brokerTick, ref, wait, refWait))
	b.out.line(p+".broker_idle", fmt.Sprintf("%.2f", idleShare(d.idle, ref)), "",
		fmt.Sprintf("share of ticks the broker ran under %.0f%% of its mean at the ceiling; the ceiling's own ticks: %.2f",
			100*brokerIdleBelow, idleShare(c.idle, ref)))
}
