package relay_test

import (
	"math"
	"strings"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/relay"
)

// TestBackoffStaysWithinBounds: the retry delay never leaves [hi/2, hi] once
// capped, never overflows however large the cap or the attempt count, and
// starts at [lo/2, lo].
func TestBackoffStaysWithinBounds(t *testing.T) {
	for _, hi := range []time.Duration{5 * time.Minute, 24 * time.Hour, math.MaxInt64} {
		for n := 1; n <= 200; n++ {
			d := relay.Backoff(n, time.Second, hi)
			if d <= 0 || d > hi {
				t.Fatalf("backoff(%d, 1s, %s) = %s: outside (0, cap]", n, hi, d)
			}
			if n == 1 && (d < 500*time.Millisecond || d > time.Second) {
				t.Fatalf("first backoff %s, want within [500ms, 1s]", d)
			}
			if n >= 100 && d < hi/2 {
				t.Fatalf("backoff(%d, 1s, %s) = %s: below half the cap", n, hi, d)
			}
		}
	}
}

// TestConfigBoundsNewLimits: relay.batch_bytes and the retry backoffs are
// bounded, and each error names its key.
func TestConfigBoundsNewLimits(t *testing.T) {
	base := relay.Config{
		Postgres: relay.PostgresConfig{DSN: "postgres://u@localhost/db"},
		AMQP:     relay.AMQPConfig{URL: "amqp://localhost/", Exchange: "x"},
	}
	if err := base.WithDefaults().Validate(); err != nil {
		t.Fatalf("defaults: %v", err)
	}
	if got := base.WithDefaults().Relay.BatchBytes; got != 16<<20 {
		t.Errorf("default relay.batch_bytes %d, want 16 MiB", got)
	}
	for key, mutate := range map[string]func(*relay.Config){
		"relay.batch_bytes":       func(c *relay.Config) { c.Relay.BatchBytes = 100 },
		"relay.retry_max_backoff": func(c *relay.Config) { c.Relay.RetryMaxBackoff = 1000 * time.Hour },
		"relay.retry_min_backoff": func(c *relay.Config) { c.Relay.RetryMinBackoff, c.Relay.RetryMaxBackoff = 25*time.Hour, 25*time.Hour },
	} {
		c := base
		mutate(&c)
		err := c.WithDefaults().Validate()
		if err == nil || !strings.Contains(err.Error(), key+":") {
			t.Errorf("%s out of bounds: error %v, want one naming the key", key, err)
		}
	}
}
