package outbox_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// oldestSupportedGo is the oldest Go release the Go team still supports
// (the two newest minor releases are): an application importing outbox must
// build with it. Move it up when a new Go release comes out.
const oldestSupportedGo = "1.25"

// helperModules are the only modules an application importing outbox
// compiles: pgx (with its own dependencies) and uuid.
var helperModules = []string{
	"github.com/outbox-relay/outbox-relay",
	"github.com/jackc/pgx/v5", "github.com/jackc/pgpassfile", "github.com/jackc/pgservicefile", "github.com/jackc/puddle/v2",
	"golang.org/x/text", "golang.org/x/sync",
	"github.com/google/uuid",
}

// goCmd runs the go command in dir, offline: primeModuleCache has put
// every module of the repository's graph in the module cache.
func goCmd(t *testing.T, dir string, args ...string) string {
	t.Helper()
	return runGo(t, dir, []string{"GOPROXY=off", "GOFLAGS=-mod=mod", "GOTOOLCHAIN=local", "GOWORK=off"}, args...)
}

// primeModuleCache fetches the go.mod of every module in the repository's
// module graph (go list -m all), as the go command's environment allows.
// Building the repository fetches fewer: a module graph is pruned below
// modules at go 1.17 or later, but not below older ones, and an
// application's build walks the unpruned part too (pgpassfile requires an
// old testify). On a fresh machine the offline build would fail for want of
// those go.mod files, not for anything outbox needs.
func primeModuleCache(t *testing.T, root string) {
	t.Helper()
	runGo(t, root, []string{"GOTOOLCHAIN=local", "GOWORK=off"}, "list", "-m", "all")
}

func runGo(t *testing.T, dir string, env []string, args ...string) string {
	t.Helper()
	cmd := exec.Command("go", args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("go %s in %s: %v\n%s", strings.Join(args, " "), dir, err, out)
	}
	return string(out)
}

// TestHelperNeedsOnlyOldestSupportedGoAndPgx checks that an application that
// imports outbox builds with the oldest supported Go and compiles nothing
// but pgx and uuid: a fresh module at that go line, requiring this one,
// keeps its go line through a build and requires only those modules.
func TestHelperNeedsOnlyOldestSupportedGoAndPgx(t *testing.T) {
	t.Parallel()
	if testing.Short() {
		t.Skip("runs the go command")
	}
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}

	gomod, err := os.ReadFile(filepath.Join(root, "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	if m := regexp.MustCompile(`(?m)^go (\d+\.\d+)`).FindSubmatch(gomod); m == nil || string(m[1]) != oldestSupportedGo {
		t.Errorf("go.mod's go line is %q, want %s.x (the oldest supported Go; see README, Writing events from Go)", m, oldestSupportedGo)
	}
	if regexp.MustCompile(`(?m)^toolchain `).Match(gomod) {
		t.Errorf("go.mod has a toolchain line: it would make applications download that toolchain")
	}

	primeModuleCache(t, root)
	mods := strings.Fields(goCmd(t, root, "list", "-deps", "-f", "{{with .Module}}{{.Path}}{{end}}", "./outbox"))
	for _, m := range mods {
		if !slices.Contains(helperModules, m) {
			t.Errorf("outbox compiles a package of module %s; it may take in only pgx and uuid", m)
		}
	}

	app := t.TempDir()
	files := map[string]string{
		"go.mod": "module example.com/app\n\ngo " + oldestSupportedGo + ".0\n\n" +
			"require github.com/outbox-relay/outbox-relay v0.0.0\n\n" +
			"replace github.com/outbox-relay/outbox-relay => " + root + "\n",
		"main.go": "package main\n\nimport \"github.com/outbox-relay/outbox-relay/outbox\"\n\n" +
			"func main() { _ = outbox.NewEvent(\"t\", []byte(\"{}\")) }\n",
	}
	// The repository's go.sum vouches for the dependencies' hashes offline.
	sum, err := os.ReadFile(filepath.Join(root, "go.sum"))
	if err != nil {
		t.Fatal(err)
	}
	files["go.sum"] = string(sum)
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(app, name), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// -mod=mod (goCmd) adds what the build needs to go.mod, as go get would.
	goCmd(t, app, "build", "-o", os.DevNull, ".")
	tidy, err := os.ReadFile(filepath.Join(app, "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(tidy), "\ngo "+oldestSupportedGo+".0\n") {
		t.Errorf("building raised the application's go line:\n%s", tidy)
	}
	for _, m := range regexp.MustCompile(`(?m)^\s+(\S+) v\S+`).FindAllStringSubmatch(string(tidy), -1) {
		if !slices.Contains(helperModules, m[1]) {
			t.Errorf("the application's go.mod requires %s; it may take in only pgx and uuid:\n%s", m[1], tidy)
		}
	}
}
