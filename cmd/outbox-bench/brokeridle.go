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

// brokerIdleBelow is the share of one core under which a tick counts as
// idle. The broker's own timers and the consumer's heartbeats stay far
// below it; routing and storing even a few dozen messages does not.
const brokerIdleBelow = 0.10

// idleSampler reads the broker's CPU every brokerTick while a measurement
// runs. A tick is idle when the broker neither ran nor waited for a CPU
// (run-queue time, from schedstat) for brokerIdleBelow of it: waiting for a
// CPU is the machine's load, not the broker waiting for work.
type idleSampler struct {
	pid   int
	stop  chan struct{}
	done  chan struct{}
	ticks int
	idle  int
	once  sync.Once
}

// sampleBroker starts sampling the broker; nil when the broker's process is
// not visible (then finish reports nothing).
func (b *bench) sampleBroker() *idleSampler {
	if b.brokerPID <= 0 {
		return nil
	}
	if _, err := schedBusy(b.brokerPID); err != nil {
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
	last, _ := schedBusy(s.pid)
	lastAt := time.Now()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
		}
		cur, err := schedBusy(s.pid)
		now := time.Now()
		if err != nil {
			continue
		}
		el := now.Sub(lastAt)
		// A tick that came late (the bench itself waited for a CPU) still
		// measures one interval: the broker's time over the real elapsed.
		if el > 0 {
			s.ticks++
			if float64(cur-last) < brokerIdleBelow*float64(el) {
				s.idle++
			}
		}
		last, lastAt = cur, now
	}
}

// finish stops sampling and returns the share of idle ticks, -1 when
// there was nothing to sample. It may be called again (deferred, for the
// error paths).
func (s *idleSampler) finish() float64 {
	if s == nil {
		return -1
	}
	s.once.Do(func() { close(s.stop) })
	<-s.done
	if s.ticks == 0 {
		return -1
	}
	return float64(s.idle) / float64(s.ticks)
}

// schedBusy returns the time pid's threads ran or waited on a run queue
// (the first two fields of /proc/PID/task/*/schedstat).
func schedBusy(pid int) (time.Duration, error) {
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return 0, err
	}
	var sum int64
	for _, t := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/schedstat", pid, t.Name()))
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				continue // the thread ended
			}
			return 0, err
		}
		f := strings.Fields(string(b))
		if len(f) < 2 {
			return 0, errors.New("malformed schedstat")
		}
		for _, v := range f[:2] {
			ns, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				return 0, fmt.Errorf("schedstat: %w", err)
			}
			sum += ns
		}
	}
	return time.Duration(sum), nil
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
	}
	share := func(v float64) string {
		if v < 0 {
			return "n/a"
		}
		return fmt.Sprintf("%.2f", v)
	}
	b.out.line(p+".broker_idle", share(d.idle), "",
		fmt.Sprintf("share of %s ticks in which the broker ran or waited for a CPU under %.0f%% of one core; ceiling beside it: %s",
			brokerTick, 100*brokerIdleBelow, share(c.idle)))
}
