package main

import "testing"

// A drain tick counts as idle when the broker ran under half its mean at
// the ceiling, whatever its threads waited for a CPU.
func TestIdleShare(t *testing.T) {
	ticks := []brokerTickSample{
		{run: 0.9, wait: 0},    // busy
		{run: 0.2, wait: 0.01}, // idle
		{run: 0.2, wait: 0.5},  // idle, and the machine was busy
		{run: 0.6, wait: 0.05}, // busy: over half
	}
	if got := idleShare(ticks, 1.0); got != 0.5 {
		t.Fatalf("idle share %.2f, want 0.50", got)
	}
	run, wait := means(ticks)
	if run < 0.474 || run > 0.476 || wait < 0.139 || wait > 0.141 {
		t.Fatalf("means run %.3f wait %.3f, want 0.475 and 0.140", run, wait)
	}
}

// -drain-alt accepts the two settings it knows and names a bad one.
func TestParseDrainAlt(t *testing.T) {
	alt, err := parseDrainAlt("max_conns=6,batch_size=1000,max_unconfirmed=250")
	if err != nil || alt.maxConns != 6 || alt.batchSize != 1000 || alt.maxUnconfirmed != 250 {
		t.Fatalf("got %+v, %v", alt, err)
	}
	for _, bad := range []string{"max_conns=0", "batch_size", "linger=5"} {
		if _, err := parseDrainAlt(bad); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}
