package main

import (
	"testing"
	"time"
)

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

// The CPU-bound ratio divides the ceiling's CPU per message by the drain's
// per event, the database backends included; a missing figure gives none.
func TestCPUBoundRatio(t *testing.T) {
	us := time.Microsecond
	// The run 00:24 of 2026-12-08, drain.mark: 32.4 + 9.2 + 39.4 µs per
	// event against 35.5 + 42.2 µs per message.
	d := drainResult{n: 1000, backends: 9200 * us,
		cpu0: cpuSnap{self: time.Second, broker: time.Second},
		cpu1: cpuSnap{self: time.Second + 32400*us, broker: time.Second + 39400*us}}
	c := publishResult{n: 2000, cpu1: cpuSnap{self: 71000 * us, broker: 84400 * us}}
	got, ok := cpuBoundRatio(d, c)
	if !ok || got < 0.958 || got > 0.960 {
		t.Fatalf("ratio %.3f, %v; want 77.7 / 81.0 = 0.959", got, ok)
	}
	d.backends = -1 // unknown
	if _, ok := cpuBoundRatio(d, c); ok {
		t.Fatal("a ratio without the backends' CPU")
	}
}
