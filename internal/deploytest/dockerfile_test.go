package deploytest

import (
	"bytes"
	"encoding/json"
	"errors"
	"go/ast"
	"go/parser"
	"go/token"
	"io"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// instruction is one Dockerfile instruction, continuation lines joined.
type instruction struct {
	cmd  string // upper case: FROM, RUN, ...
	args string
}

// stage is one FROM ... stage.
type stage struct {
	base, name string
	ins        []instruction
}

func dockerfile(t *testing.T) (args map[string]string, stages []*stage) {
	t.Helper()
	args = map[string]string{}
	var cur strings.Builder
	var all []instruction
	for _, line := range strings.Split(read(t, "Dockerfile"), "\n") {
		trimmed := strings.TrimSpace(line)
		if cur.Len() == 0 && (trimmed == "" || strings.HasPrefix(trimmed, "#")) {
			continue
		}
		if strings.HasPrefix(trimmed, "#") {
			continue // a comment inside a continued instruction
		}
		if s, ok := strings.CutSuffix(trimmed, `\`); ok {
			cur.WriteString(s + " ")
			continue
		}
		cur.WriteString(trimmed)
		cmd, rest, _ := strings.Cut(cur.String(), " ")
		all = append(all, instruction{cmd: strings.ToUpper(cmd), args: strings.TrimSpace(rest)})
		cur.Reset()
	}
	for _, in := range all {
		switch {
		case in.cmd == "ARG" && len(stages) == 0:
			k, v, _ := strings.Cut(in.args, "=")
			args[k] = v
		case in.cmd == "FROM":
			f := strings.Fields(in.args)
			st := &stage{base: expandArgs(f[0], args)}
			if len(f) == 3 && strings.EqualFold(f[1], "AS") {
				st.name = f[2]
			}
			stages = append(stages, st)
		case len(stages) > 0:
			stages[len(stages)-1].ins = append(stages[len(stages)-1].ins, in)
		}
	}
	if len(stages) < 2 {
		t.Fatalf("Dockerfile: %d stages, want a build stage and a final stage", len(stages))
	}
	return args, stages
}

func expandArgs(s string, args map[string]string) string {
	return regexp.MustCompile(`\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?`).ReplaceAllStringFunc(s, func(m string) string {
		name := strings.Trim(m, "${}")
		return args[name]
	})
}

// execForm parses a JSON-array (exec form) instruction argument.
func execForm(t *testing.T, in instruction) []string {
	t.Helper()
	var v []string
	if err := json.Unmarshal([]byte(in.args), &v); err != nil {
		t.Errorf("Dockerfile: %s %s is not in exec form (a JSON array): %v", in.cmd, in.args, err)
	}
	return v
}

func TestDockerfile(t *testing.T) {
	t.Parallel()
	_, stages := dockerfile(t)
	final := stages[len(stages)-1]

	// The builder: a Go image of go.mod's minor release, a static,
	// trimmed, stamped build of the command package that exists.
	var build *stage
	var buildRun string
	for _, st := range stages[:len(stages)-1] {
		for _, in := range st.ins {
			if in.cmd == "RUN" && strings.Contains(in.args, "go build") {
				build, buildRun = st, in.args
			}
		}
	}
	if build == nil {
		t.Fatal("Dockerfile: no stage runs go build")
	}
	// go.mod's go line is the floor applications importing outbox need;
	// the daemon is built with that release or a newer one.
	goMod := regexp.MustCompile(`(?m)^go 1\.(\d+)`).FindStringSubmatch(read(t, "go.mod"))
	img := regexp.MustCompile(`^golang:1\.(\d+)`).FindStringSubmatch(build.base)
	if img == nil || atoi(img[1]) < atoi(goMod[1]) {
		t.Errorf("Dockerfile: builder FROM %s, want golang:1.%s or newer (go.mod says go 1.%s)", build.base, goMod[1], goMod[1])
	}
	for _, want := range []string{"CGO_ENABLED=0", "-trimpath", "-s -w", "-X main.version=", "-X main.commit="} {
		if !strings.Contains(buildRun, want) {
			t.Errorf("Dockerfile: go build without %s: %s", want, buildRun)
		}
	}
	fields := strings.Fields(buildRun)
	pkg, out := "", ""
	for i, f := range fields {
		if strings.HasPrefix(f, "./") && i > 0 && fields[i-1] != "-o" {
			pkg = f
		}
		if f == "-o" && i+1 < len(fields) {
			out = fields[i+1]
		}
	}
	if pkg == "" || out == "" {
		t.Fatalf("Dockerfile: cannot find the package and -o of: %s", buildRun)
	}
	checkMainPackage(t, pkg)

	// The final stage copies that binary to /outbox-relay, runs as a
	// non-root user and serves the metrics port.
	copied, user := false, ""
	var entrypoint, cmd []string
	var exposed []string
	for _, in := range final.ins {
		switch in.cmd {
		case "COPY":
			f := strings.Fields(in.args)
			if len(f) == 3 && f[0] == "--from="+build.name && f[1] == out && f[2] == "/outbox-relay" {
				copied = true
			}
		case "USER":
			user = in.args
		case "ENTRYPOINT":
			entrypoint = execForm(t, in)
		case "CMD":
			cmd = execForm(t, in)
		case "EXPOSE":
			exposed = append(exposed, strings.Fields(in.args)...)
		case "HEALTHCHECK":
			t.Error("Dockerfile: HEALTHCHECK cannot run on distroless (no shell, no curl)")
		}
	}
	if !copied {
		t.Errorf("Dockerfile: the final stage does not COPY --from=%s %s /outbox-relay", build.name, out)
	}
	if !strings.HasPrefix(final.base, "gcr.io/distroless/static") && final.base != "scratch" {
		t.Errorf("Dockerfile: final stage FROM %s, want distroless/static or scratch", final.base)
	}
	uid, _, _ := strings.Cut(user, ":")
	if uid == "" || uid == "0" || uid == "root" || strings.Trim(uid, "0123456789") != "" {
		t.Errorf("Dockerfile: USER %q, want a numeric non-root user (Kubernetes' runAsNonRoot checks numbers)", user)
	}
	if strings.Join(entrypoint, " ") != "/outbox-relay" {
		t.Errorf("Dockerfile: ENTRYPOINT %q, want [\"/outbox-relay\"]", entrypoint)
	}
	if len(cmd) != 3 || cmd[0] != "run" || cmd[1] != "--config" {
		t.Errorf("Dockerfile: CMD %q, want [\"run\", \"--config\", FILE]", cmd)
	} else if !copiesTo(final, cmd[2]) {
		// The image must have the file CMD reads (empty of keys, so the
		// environment alone can configure the relay).
		t.Errorf("Dockerfile: CMD reads %s, which the final stage does not COPY", cmd[2])
	}
	if !contains(exposed, metricsPort(t)) {
		t.Errorf("Dockerfile: EXPOSE %v, want the metrics port %s", exposed, metricsPort(t))
	}
}

func copiesTo(st *stage, dst string) bool {
	for _, in := range st.ins {
		if f := strings.Fields(in.args); in.cmd == "COPY" && len(f) > 1 && f[len(f)-1] == dst {
			return true
		}
	}
	return false
}

// checkMainPackage checks that pkg (./cmd/...) is a main package that
// declares the version and commit variables the -X flags set.
func checkMainPackage(t *testing.T, pkg string) {
	t.Helper()
	dir := filepath.Join(root(t), filepath.FromSlash(pkg))
	pkgs, err := parser.ParseDir(token.NewFileSet(), dir, nil, 0)
	if err != nil {
		t.Fatalf("Dockerfile builds %s: %v", pkg, err)
	}
	main, ok := pkgs["main"]
	if !ok {
		t.Fatalf("Dockerfile builds %s, which is not a main package", pkg)
	}
	vars := map[string]bool{}
	for _, f := range main.Files {
		for _, d := range f.Decls {
			if g, ok := d.(*ast.GenDecl); ok && g.Tok == token.VAR {
				for _, spec := range g.Specs {
					for _, n := range spec.(*ast.ValueSpec).Names {
						vars[n.Name] = true
					}
				}
			}
		}
	}
	for _, v := range []string{"version", "commit"} {
		if !vars[v] {
			t.Errorf("Dockerfile sets main.%s, which %s does not declare", v, pkg)
		}
	}
}

// TestDockerignore: no file that `go build ./cmd/outbox-relay` reads is
// excluded from the build context.
func TestDockerignore(t *testing.T) {
	t.Parallel()
	patterns := dockerignore(t)
	gobin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go is not on PATH")
	}
	c := exec.Command(gobin, "list", "-deps", "-json", "./cmd/outbox-relay")
	c.Dir = root(t)
	var stdout, stderr bytes.Buffer
	c.Stdout, c.Stderr = &stdout, &stderr
	if err := c.Run(); err != nil {
		t.Fatalf("go list: %v\n%s", err, stderr.String())
	}
	needed := []string{"go.mod", "go.sum"}
	dec := json.NewDecoder(&stdout)
	for {
		var p struct {
			Dir        string
			Module     *struct{ Main bool }
			GoFiles    []string
			EmbedFiles []string
		}
		if err := dec.Decode(&p); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		if p.Module == nil || !p.Module.Main {
			continue
		}
		rel, err := filepath.Rel(root(t), p.Dir)
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range append(p.GoFiles, p.EmbedFiles...) {
			needed = append(needed, path.Join(filepath.ToSlash(rel), f))
		}
	}
	for _, f := range needed {
		if ignored(patterns, f) {
			t.Errorf(".dockerignore excludes %s, which the build needs", f)
		}
	}
	for _, f := range []string{".git/HEAD", "bin/outbox-relay", "deploy/systemd/outbox-relay.env"} {
		if !ignored(patterns, f) {
			t.Errorf(".dockerignore lets %s into the build context", f)
		}
	}
}

// dockerignore reads .dockerignore. The matcher below follows Docker's rules
// for what the file uses (filepath.Match patterns relative to the context,
// a match on a directory excludes what is inside, "!" re-includes, the last
// match wins); "**" is not supported, so the file must not use it.
func dockerignore(t *testing.T) []string {
	t.Helper()
	var out []string
	for _, line := range strings.Split(read(t, ".dockerignore"), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if strings.Contains(line, "**") {
			t.Fatalf(".dockerignore: %q: this test's matcher does not support **", line)
		}
		neg := strings.HasPrefix(line, "!")
		p := path.Clean(strings.TrimPrefix(strings.TrimPrefix(line, "!"), "/"))
		if neg {
			p = "!" + p
		}
		out = append(out, p)
	}
	return out
}

func ignored(patterns []string, file string) bool {
	excluded := false
	for _, p := range patterns {
		neg := strings.HasPrefix(p, "!")
		p = strings.TrimPrefix(p, "!")
		for f := file; f != "." && f != "/"; f = path.Dir(f) {
			if ok, _ := path.Match(p, f); ok {
				excluded = !neg
				break
			}
		}
	}
	return excluded
}

func TestIgnored(t *testing.T) {
	t.Parallel()
	pats := []string{"*.md", "docs", "deploy", "!deploy/keep.txt"}
	for f, want := range map[string]bool{
		"README.md": true, "docs/a.md": true, "docs/x/y.go": true, "deploy/k8s/a.yaml": true,
		"deploy/keep.txt": false, "cmd/main.go": false, "schema/migrations/1.sql": false,
	} {
		if got := ignored(pats, f); got != want {
			t.Errorf("ignored(%s) = %v, want %v", f, got, want)
		}
	}
}

func atoi(s string) int {
	n, _ := strconv.Atoi(s)
	return n
}
