package relay

import "testing"

// A settle commits only when the rows it marked by ctid are exactly the
// ones confirmed, in any order.
func TestSameSeqs(t *testing.T) {
	for _, c := range []struct {
		marked, done []int64
		ok           bool
	}{
		{[]int64{3, 1, 2}, []int64{1, 2, 3}, true},
		{nil, nil, true},
		{[]int64{1, 2}, []int64{1, 2, 3}, false},    // a row not found
		{[]int64{1, 2, 4}, []int64{1, 2, 3}, false}, // another row marked
		{[]int64{1, 1, 2}, []int64{1, 2, 3}, false}, // one row twice
		{[]int64{1, 2, 3, 4}, []int64{1, 2, 3}, false},
	} {
		if err := sameSeqs(c.marked, c.done); (err == nil) != c.ok {
			t.Errorf("sameSeqs(%v, %v) = %v, want ok %v", c.marked, c.done, err, c.ok)
		}
	}
}
