package relay

import "time"

// floorRescan bounds how long a claim floor stands: the first claim after
// it looks from the start of the pending index again.
const floorRescan = 250 * time.Millisecond

// claimFloor lets the claims of a backlog drain start above the rows the
// last claim took instead of at the start of the pending index (unordered
// mode). A claim from the start walks, before it reaches a row it can
// take, every row of the batches in flight (locked, so skipped one by
// one) and every index entry the dispatched rows left behind until
// vacuum; during a drain that walk grows with the batches and with the
// rows drained, and it was most of a claim's cost.
//
// Rows below the floor may still be due: a transaction that drew its seq
// before rows above it commits after they were claimed, a failed row
// comes back after its backoff, rows locked past a batch's byte budget
// are freed when it settles. The floor therefore stands only while claims
// come back full (more is due at once), and for floorRescan at most: such
// a row waits at most that much longer than it would have.
//
// It is used by the claim loop's goroutine only.
type claimFloor struct {
	seq  int64     // claims take rows above it; 0: from the start
	from time.Time // when the last claim from the start began
}

// next returns the floor for a claim beginning at now.
func (f *claimFloor) next(now time.Time) int64 {
	if f.seq > 0 && now.Sub(f.from) >= floorRescan {
		f.seq = 0
	}
	if f.seq == 0 {
		f.from = now
	}
	return f.seq
}

// claimed records a claim's outcome: the highest seq it took, and whether
// it was full (took relay.batch_size rows: more are likely due now).
func (f *claimFloor) claimed(top int64, full bool) {
	if !full {
		f.seq = 0
		return
	}
	f.seq = max(f.seq, top)
}

// top is the highest seq of a claim's rows.
func top(msgs []Message, invalid []failure) int64 {
	t := int64(0)
	for _, m := range msgs {
		t = max(t, m.Seq)
	}
	for _, bad := range invalid {
		t = max(t, bad.msg.Seq)
	}
	return t
}
