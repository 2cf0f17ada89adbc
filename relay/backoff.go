package relay

import (
	"context"
	"math/rand/v2"
	"time"
)

// sleep waits for d or until ctx is done.
func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// reconnectDelay is the wait before retrying a failed link: 100 ms doubling
// to 1 s, jittered. The cap is low on purpose: a dial or a probe per second
// costs nothing, and the relay claims within a second of a link's return.
func reconnectDelay(failures int) time.Duration {
	return backoff(failures, 100*time.Millisecond, time.Second)
}

// backoff is the capped exponential delay before attempt n (n ≥ 1), with
// "equal jitter": uniformly in [d/2, d].
func backoff(n int, lo, hi time.Duration) time.Duration {
	d := lo
	for i := 1; i < n && d < hi; i++ {
		if d > hi/2 { // doubling would pass hi, or overflow
			d = hi
			break
		}
		d *= 2
	}
	d = min(d, hi)
	half := d / 2
	return half + rand.N(d-half+1)
}
