package deploytest

import (
	"regexp"
	"strings"
	"testing"
)

// TestREADMEGoVersion checks that the Go release the README says an
// application needs to import the helper is go.mod's go line.
func TestREADMEGoVersion(t *testing.T) {
	t.Parallel()
	m := regexp.MustCompile(`(?m)^go (\d+\.\d+)`).FindStringSubmatch(read(t, "go.mod"))
	if m == nil {
		t.Fatal("go.mod has no go line")
	}
	row := regexp.MustCompile("(?m)^\\| Go, to import .*\\|.*go\\.mod.*: (\\d+\\.\\d+)").FindStringSubmatch(read(t, "README.md"))
	if row == nil {
		t.Fatal("README.md's Supported versions table has no Go row naming go.mod's version")
	}
	if row[1] != m[1] && !strings.HasPrefix(m[1], row[1]+".") {
		t.Errorf("README.md says Go %s, go.mod's go line says %s", row[1], m[1])
	}
}
