package main

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// The events committed before the first one arrived waited for the idle
// relay's wake-up: they count in p99_with_wake, not in the flow's
// percentiles. A committed event that never arrived is missing.
func TestSplitWake(t *testing.T) {
	const ms = int64(time.Millisecond)
	commits := []int64{10 * ms, 20 * ms, 70 * ms, 80 * ms, 90 * ms, 0}
	recv := []int64{
		62 * ms, // the wake-up: 52 ms
		63 * ms, // committed before the first arrival: 43 ms
		72 * ms, // the flow from here: 2 ms
		83 * ms, // 3 ms
		0,       // missing
		0,       // never committed
	}
	l := splitWake(commits, recv)
	if l.wake != 52*time.Millisecond || l.woken != 2 || l.missing != 1 {
		t.Fatalf("wake %v, woken %d, missing %d; want 52ms, 2, 1", l.wake, l.woken, l.missing)
	}
	if want := []time.Duration{2 * time.Millisecond, 3 * time.Millisecond}; len(l.flow) != 2 || l.flow[0] != want[0] || l.flow[1] != want[1] {
		t.Fatalf("flow %v, want %v", l.flow, want)
	}
	if len(l.all) != 4 || l.all[3] != 52*time.Millisecond {
		t.Fatalf("all %v, want the four received, the wake-up's last", l.all)
	}
}

func TestDumpTimes(t *testing.T) {
	path := filepath.Join(t.TempDir(), "points", "poll.rate_1000.txt")
	// Event 1 was never committed (the point ended first); event 2 was
	// committed and never received.
	if err := dumpTimes(path, []int64{10, 0, 30}, []int64{15, 0, 0}); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if want := "10 15\n30 0\n"; string(got) != want {
		t.Fatalf("dump:\n%s\nwant:\n%s", got, want)
	}
}
