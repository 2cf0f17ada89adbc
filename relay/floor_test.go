package relay

import "testing"

func TestClaimFloor(t *testing.T) {
	full := func(lo int64) *batch {
		b := &batch{}
		for s := lo; s < lo+4; s++ {
			b.msgs = append(b.msgs, Message{Seq: s})
		}
		b.invalid = []failure{{msg: Message{Seq: lo + 4}}}
		return b
	}
	var f claimFloor
	f.next(full(10), 5)
	if f.seq != 14 {
		t.Fatalf("after a full batch of seq 10..14 (the last one invalid): floor %d, want 14", f.seq)
	}
	for i := 2; i < sweepEvery; i++ {
		f.next(full(int64(10*i)), 5)
	}
	if f.seq == 0 || f.since != sweepEvery-1 {
		t.Fatalf("after %d full batches: floor %d, since %d", sweepEvery-1, f.seq, f.since)
	}
	f.next(full(100), 5)
	if f != (claimFloor{}) {
		t.Fatalf("claim number %d must sweep from the bottom, floor is %+v", sweepEvery, f)
	}
	f.next(full(200), 5)
	f.next(&batch{msgs: []Message{{Seq: 300}}}, 5)
	if f != (claimFloor{}) {
		t.Fatalf("a batch that was not full must reset the floor, got %+v", f)
	}
}
