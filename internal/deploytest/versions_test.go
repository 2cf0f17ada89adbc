package deploytest

import (
	"regexp"
	"testing"
)

// TestREADMEGoVersion checks that the README's Supported versions table
// quotes go.mod's go line exactly as go.mod writes it (go 1.25.0, not a
// prefix such as 1.25 that a later 1.25.3 would still match).
func TestREADMEGoVersion(t *testing.T) {
	t.Parallel()
	m := regexp.MustCompile(`(?m)^go (\S+)\s*$`).FindStringSubmatch(read(t, "go.mod"))
	if m == nil {
		t.Fatal("go.mod has no go line")
	}
	row := regexp.MustCompile("(?m)^\\| Go, to import .*\\|.*go\\.mod.*: `go ([^`]+)`").FindStringSubmatch(read(t, "README.md"))
	if row == nil {
		t.Fatal("README.md's Supported versions table has no Go row quoting go.mod's go line as `go X.Y.Z`")
	}
	if row[1] != m[1] {
		t.Errorf("README.md quotes `go %s`, go.mod's go line is go %s", row[1], m[1])
	}
}
