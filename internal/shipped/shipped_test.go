package shipped

import (
	"strconv"
	"strings"
	"testing"
)

// TestReadMemory: the shipped manifest yields a container limit and a
// GOMEMLIMIT below it, as the garbage collector needs headroom.
func TestReadMemory(t *testing.T) {
	m, err := ReadMemory("../..")
	if err != nil {
		t.Fatal(err)
	}
	mib, err := strconv.ParseInt(strings.TrimSuffix(m.GOMEMLIMIT, "MiB"), 10, 64)
	if err != nil || m.Limit <= 0 || mib<<20 >= m.Limit {
		t.Fatalf("limit %d bytes, GOMEMLIMIT %q: want a GOMEMLIMIT in MiB below the limit", m.Limit, m.GOMEMLIMIT)
	}
}
