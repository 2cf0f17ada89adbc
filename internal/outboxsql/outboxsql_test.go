package outboxsql_test

import (
	"io/fs"
	"regexp"
	"strings"
	"testing"

	"github.com/outbox-relay/outbox-relay/internal/ident"
	"github.com/outbox-relay/outbox-relay/internal/outboxsql"
	"github.com/outbox-relay/outbox-relay/schema"
)

// partialIndex matches a partial index of the rendered migrations: its
// unqualified quoted name and its predicate.
var partialIndex = regexp.MustCompile(`(?s)CREATE INDEX "t_(\w+)" ON [^;]*?\)\s+WHERE\s+([^;]+);`)

// TestPredicatesMatchMigrations: every partial index the migrations create
// has the predicate of its constant, letter for letter, and every partial
// index has a constant: a query written with the constant is one the planner
// can answer from the index.
func TestPredicatesMatchMigrations(t *testing.T) {
	want := map[string]string{
		"pending":     outboxsql.Pending,
		"pending_key": outboxsql.Pending,
		"dead":        outboxsql.Dead,
	}
	fsys, err := schema.Render(ident.Table{Schema: "s", Name: "t"})
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	err = fs.WalkDir(fsys, ".", func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		src, err := fs.ReadFile(fsys, path)
		if err != nil {
			return err
		}
		for _, m := range partialIndex.FindAllStringSubmatch(string(src), -1) {
			name, pred := m[1], strings.Join(strings.Fields(m[2]), " ")
			pw, ok := want[name]
			switch {
			case !ok:
				t.Errorf("%s: partial index %s has no constant in outboxsql", path, name)
			case pred != pw:
				t.Errorf("%s: index %s has predicate %q, outboxsql has %q", path, name, pred, pw)
			}
			seen[name] = true
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for name := range want {
		if !seen[name] {
			t.Errorf("no migration creates the partial index %s", name)
		}
	}
}

// TestQualified: an aliased predicate qualifies every column and nothing else.
func TestQualified(t *testing.T) {
	for pred, want := range map[string]string{
		outboxsql.Pending: `e.dispatched_at IS NULL AND e.dead_at IS NULL`,
		outboxsql.Dead:    `d.dead_at IS NOT NULL`,
	} {
		alias := string(want[0])
		if got := outboxsql.Qualified(alias, pred); got != want {
			t.Errorf("Qualified(%q, %q) = %q, want %q", alias, pred, got, want)
		}
	}
}
