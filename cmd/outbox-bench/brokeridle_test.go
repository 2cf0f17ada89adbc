package main

import "testing"

// A drain tick counts as idle only when the broker ran under half its
// ceiling mean without waiting for a CPU; waiting makes it starved instead.
func TestIdleShares(t *testing.T) {
	ticks := []brokerTickSample{
		{run: 0.9, wait: 0},    // busy
		{run: 0.2, wait: 0.01}, // idle: under half of 1.0, not waiting
		{run: 0.2, wait: 0.5},  // starved: the machine held it back
		{run: 0.6, wait: 0.05}, // busy: over half
	}
	idle, starved := idleShares(ticks, 1.0)
	if idle != 0.25 || starved != 0.25 {
		t.Fatalf("idle %.2f starved %.2f, want 0.25 and 0.25", idle, starved)
	}
	if got := meanRun(ticks); got < 0.474 || got > 0.476 {
		t.Fatalf("mean run %.3f, want 0.475", got)
	}
}

// -drain-alt accepts the two settings it knows and names a bad one.
func TestParseDrainAlt(t *testing.T) {
	alt, err := parseDrainAlt("max_conns=6,batch_size=1000")
	if err != nil || alt.maxConns != 6 || alt.batchSize != 1000 {
		t.Fatalf("got %+v, %v", alt, err)
	}
	for _, bad := range []string{"max_conns=0", "batch_size", "linger=5"} {
		if _, err := parseDrainAlt(bad); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}
