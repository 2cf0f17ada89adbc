package relay

import (
	"math"
	"time"
)

// flowTau is the time constant of the claim loop's flow estimate: long
// enough that one burst or one stall does not swing it, short enough that a
// change of load shows within a few tenths of a second.
const flowTau = 100 * time.Millisecond

// flowMeter estimates the rate at which rows are claimed, in rows/s, as an
// exponentially decaying average over time. Each claim reports the rows it
// took; they arrived in the time since the previous claim.
type flowMeter struct {
	last time.Time
	rate float64
}

// add records a claim of n rows at now and returns the updated estimate.
// The first claim only starts the clock: its rows may have waited for any
// length of time.
func (f *flowMeter) add(now time.Time, n int) float64 {
	if f.last.IsZero() {
		f.last = now
		return f.rate
	}
	dt := now.Sub(f.last).Seconds()
	if dt <= 0 {
		return f.rate
	}
	f.last = now
	w := 1 - math.Exp(-dt/flowTau.Seconds())
	f.rate += w * (float64(n)/dt - f.rate)
	return f.rate
}

// pollBackoff is the wait after the next empty probe in poll mode, given
// this one's wait and the claim rate. It doubles up to wake.poll_interval,
// except while rows were still claimed faster than one per
// wake.min_interval: an empty probe in such a flow is a pause (a slow
// fsync, producers descheduled), not its end, and doubling there would add
// up to the pause's length again to the wait of the rows committed after
// it. Holding costs probes at the rate the flowing loop claimed anyway, for
// as long as the flow estimate takes to decay below that (70 ms from
// 1,000/s with the defaults).
func pollBackoff(interval time.Duration, flowRate float64, w WakeConfig) time.Duration {
	if flowRate*w.MinInterval.Seconds() >= 1 {
		return w.MinInterval
	}
	return min(2*interval, w.PollInterval)
}
