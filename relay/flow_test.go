package relay

import (
	"testing"
	"time"
)

// feed reports claims of n rows every step, from *now for d, and returns the
// last estimate.
func feed(f *flowMeter, now *time.Time, step, d time.Duration, n int) float64 {
	var rate float64
	for end := now.Add(d); now.Before(end); {
		*now = now.Add(step)
		rate = f.add(*now, n)
	}
	return rate
}

func TestFlowMeter(t *testing.T) {
	lingerAbove := float64(Config{}.WithDefaults().Wake.LingerAbove)
	t0 := time.Date(2026, 12, 2, 0, 0, 0, 0, time.UTC)
	steady := func(t *testing.T) (*flowMeter, *time.Time) {
		t.Helper()
		f, now := &flowMeter{}, t0
		if got := f.add(now, 500); got != 0 {
			t.Fatalf("first claim: rate %v, want 0 (its rows may have waited any time)", got)
		}
		// 1,000 events/s, claimed 5 at a time every 5 ms.
		if got := feed(f, &now, 5*time.Millisecond, time.Second, 5); got < 990 || got > 1010 {
			t.Fatalf("steady 1000/s: rate %.0f", got)
		}
		return f, &now
	}
	t.Run("stall", func(t *testing.T) {
		// The loop stalls 50 ms, then claims the 50 rows that arrived.
		f, now := steady(t)
		*now = now.Add(50 * time.Millisecond)
		if got := f.add(*now, 50); got < 990 || got > 1010 {
			t.Fatalf("after a stall: rate %.0f, want still 1000", got)
		}
	})
	t.Run("burst", func(t *testing.T) {
		// 50 rows committed at once on top of the steady flow move the
		// estimate, but not past the default linger threshold.
		f, now := steady(t)
		*now = now.Add(5 * time.Millisecond)
		got := f.add(*now, 55)
		if got <= 1010 || got >= lingerAbove {
			t.Fatalf("after a burst: rate %.0f, want above 1000 and below %.0f", got, lingerAbove)
		}
	})
	t.Run("heavy", func(t *testing.T) {
		// A rise to 6,000/s shows within a few tenths of a second.
		f, now := steady(t)
		if got := feed(f, now, 20*time.Millisecond, 300*time.Millisecond, 120); got < 5000 {
			t.Fatalf("300 ms into 6000/s: rate %.0f", got)
		}
	})
	t.Run("idle", func(t *testing.T) {
		// Empty probes decay the estimate towards 0.
		f, now := steady(t)
		if got := feed(f, now, 100*time.Millisecond, time.Second, 0); got > 1 {
			t.Fatalf("after 1 s idle: rate %.2f", got)
		}
	})
	t.Run("no time passed", func(t *testing.T) {
		f, now := steady(t)
		before := f.rate
		if got := f.add(*now, 1000); got != before {
			t.Fatalf("a claim at the same instant moved the rate from %.0f to %.0f", before, got)
		}
	})
}

// TestPollBackoff: after an empty probe in poll mode, the wait doubles up to
// wake.poll_interval, unless the flow just seen still claimed more than a
// row per wake.min_interval; a pause in such a flow keeps the flowing
// cadence until the estimate decays.
func TestPollBackoff(t *testing.T) {
	w := Config{}.WithDefaults().Wake // min 2 ms, poll 100 ms
	for _, c := range []struct {
		name     string
		interval time.Duration
		rate     float64
		want     time.Duration
	}{
		{"idle doubles", 2 * time.Millisecond, 0, 4 * time.Millisecond},
		{"capped at poll_interval", 64 * time.Millisecond, 0, 100 * time.Millisecond},
		{"stays at poll_interval", 100 * time.Millisecond, 0, 100 * time.Millisecond},
		{"slow flow doubles", 2 * time.Millisecond, 499, 4 * time.Millisecond},
		{"a row per min_interval holds", 2 * time.Millisecond, 500, 2 * time.Millisecond},
		{"heavy flow holds", 2 * time.Millisecond, 630, 2 * time.Millisecond},
	} {
		if got := pollBackoff(c.interval, c.rate, w); got != c.want {
			t.Errorf("%s: pollBackoff(%v, %.0f/s) = %v, want %v", c.name, c.interval, c.rate, got, c.want)
		}
	}
	// A flow of 1,000/s pausing: the probes every 2 ms decay the estimate;
	// the loop holds its cadence for 60-80 ms, then backs off.
	f, now := &flowMeter{}, time.Date(2026, 12, 8, 0, 0, 0, 0, time.UTC)
	f.add(now, 0)
	feed(f, &now, 5*time.Millisecond, time.Second, 5)
	held, interval := time.Duration(0), w.MinInterval
	for interval == w.MinInterval && held < time.Second {
		now = now.Add(interval)
		held += interval
		interval = pollBackoff(interval, f.add(now, 0), w)
	}
	if held < 60*time.Millisecond || held > 80*time.Millisecond {
		t.Errorf("a pause in 1,000/s held min_interval for %v, want 60-80 ms", held)
	}
}
