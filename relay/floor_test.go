package relay

import (
	"testing"
	"time"
)

func TestClaimFloor(t *testing.T) {
	t0 := time.Now()
	var f claimFloor
	if got := f.next(t0); got != 0 {
		t.Fatalf("first claim: floor %d, want 0", got)
	}
	f.claimed(500, true)
	if got := f.next(t0.Add(10 * time.Millisecond)); got != 500 {
		t.Fatalf("after a full claim: floor %d, want 500", got)
	}
	f.claimed(1000, true)
	f.claimed(700, true) // a claim can end below the one before (rows freed)
	if got := f.next(t0.Add(20 * time.Millisecond)); got != 1000 {
		t.Fatalf("after full claims up to 1000: floor %d, want 1000", got)
	}
	f.claimed(1200, false)
	if got := f.next(t0.Add(30 * time.Millisecond)); got != 0 {
		t.Fatalf("after a short claim: floor %d, want 0", got)
	}
	// The claim from the start at +30ms opened a window of floorRescan.
	f.claimed(1500, true)
	if got := f.next(t0.Add(30*time.Millisecond + floorRescan - time.Millisecond)); got != 1500 {
		t.Fatalf("within floorRescan: floor %d, want 1500", got)
	}
	if got := f.next(t0.Add(30*time.Millisecond + floorRescan)); got != 0 {
		t.Fatalf("floorRescan after the last claim from the start: floor %d, want 0", got)
	}
	f.claimed(1600, true)
	if got := f.next(t0.Add(40*time.Millisecond + floorRescan)); got != 1600 {
		t.Fatalf("the rescan opened a new window: floor %d, want 1600", got)
	}
}

func TestClaimTop(t *testing.T) {
	if got := top([]Message{{Seq: 3}, {Seq: 9}}, []failure{{msg: Message{Seq: 12}}}); got != 12 {
		t.Fatalf("top of a claim ending in a parked row: %d, want 12", got)
	}
	if got := top([]Message{{Seq: 20}, {Seq: 4}}, nil); got != 20 {
		t.Fatalf("top: %d, want 20", got)
	}
	if got := top(nil, nil); got != 0 {
		t.Fatalf("top of nothing: %d, want 0", got)
	}
}
