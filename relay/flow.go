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
