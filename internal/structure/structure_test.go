package structure

import (
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"
)

// maxEngineLines bounds a non-test file of the engine (relay/ and the
// packages below it): past it, a file holds more than one job.
const maxEngineLines = 400

// TestEngineFilesAreShort checks that no non-test .go file under relay/ is
// longer than maxEngineLines lines.
func TestEngineFilesAreShort(t *testing.T) {
	root := moduleRoot(t)
	var long []string
	err := filepath.WalkDir(filepath.Join(root, "relay"), func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && d.Name() == "testdata" {
			return filepath.SkipDir
		}
		if d.IsDir() || !isSource(d.Name()) {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		if n := strings.Count(string(b), "\n"); n > maxEngineLines {
			long = append(long, fmt.Sprintf("%s: %d lines", rel(root, path), n))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(long) > 0 {
		t.Errorf("%d engine files over %d lines (split them by job):\n\t%s",
			len(long), maxEngineLines, strings.Join(long, "\n\t"))
	}
}

// TestExportedNamesDocumented checks that every exported type, function,
// method (of an exported type), constant and variable of every package but
// main has a doc comment. A comment on a parenthesised group, or at the end
// of a value's line, counts.
func TestExportedNamesDocumented(t *testing.T) {
	root := moduleRoot(t)
	var missing []string
	for _, p := range loadPackages(t, root) {
		if p.name == "main" {
			continue
		}
		for _, f := range p.files {
			if f.test {
				continue
			}
			for _, name := range undocumented(f.ast) {
				pos := p.fset.Position(name.Pos())
				missing = append(missing, fmt.Sprintf("%s:%d %s", rel(root, pos.Filename), pos.Line, name.Name))
			}
		}
	}
	if len(missing) > 0 {
		sort.Strings(missing)
		t.Errorf("%d exported names without a doc comment:\n\t%s", len(missing), strings.Join(missing, "\n\t"))
	}
}

// undocumented returns the identifiers of f's exported declarations that have
// no doc comment.
func undocumented(f *ast.File) []*ast.Ident {
	var out []*ast.Ident
	for _, decl := range f.Decls {
		switch d := decl.(type) {
		case *ast.FuncDecl:
			if !d.Name.IsExported() || d.Doc != nil {
				continue
			}
			if d.Recv != nil && !ast.IsExported(receiverType(d.Recv.List[0].Type)) {
				continue // invisible outside the package
			}
			out = append(out, d.Name)
		case *ast.GenDecl:
			if d.Tok == token.IMPORT {
				continue
			}
			grouped := d.Lparen.IsValid() && d.Doc != nil
			for _, spec := range d.Specs {
				switch s := spec.(type) {
				case *ast.TypeSpec:
					if s.Name.IsExported() && !grouped && d.Doc == nil && s.Doc == nil && s.Comment == nil {
						out = append(out, s.Name)
					}
				case *ast.ValueSpec:
					if grouped || d.Doc != nil || s.Doc != nil || s.Comment != nil {
						continue
					}
					for _, n := range s.Names {
						if n.IsExported() {
							out = append(out, n)
						}
					}
				}
			}
		}
	}
	return out
}

// TestArchitectureDoc checks docs/architecture.md against the tree, in the
// conventions the document states at its end:
//   - a path ending in .go (relay/batch.go) names an existing file;
//   - a path followed by a colon and names (relay/batch.go: claim, settle,
//     or relay/relay.go: Run → claimLoop, or a method as (*Relay).Run)
//     names functions, methods, types, constants or variables declared in
//     that file;
//   - a backquoted directory (`relay/rabbitmq/`) exists;
//   - pkg.Name, pkg.Type.Method and (*pkg.Type).Method name something
//     declared in the package of that name in this module; a pkg outside the
//     module must be one of the few in external;
//   - a relative link resolves to a file;
//   - no TODO(…) placeholder is left.
//
// It also checks that README.md links the document.
func TestArchitectureDoc(t *testing.T) {
	root := moduleRoot(t)
	raw, err := os.ReadFile(filepath.Join(root, docPath))
	if err != nil {
		t.Fatalf("the architecture document: %v", err)
	}
	bad := checkDoc(root, string(raw), loadPackages(t, root))
	readme, err := os.ReadFile(filepath.Join(root, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(readme), "("+docPath+")") {
		bad = append(bad, "README.md does not link "+docPath)
	}
	if len(bad) > 0 {
		t.Errorf("%d references in %s that do not match the tree:\n\t%s", len(bad), docPath, strings.Join(bad, "\n\t"))
	}
}

// TestCheckDocCatchesStaleNames feeds checkDoc one stale reference of each
// kind, next to good ones, and expects each stale one reported, alone.
func TestCheckDocCatchesStaleNames(t *testing.T) {
	root := moduleRoot(t)
	doc := strings.Join([]string{
		"good: `outbox/write.go: Write, (*Writer).Write` and outbox.Write, (*outbox.Writer).Write, pgx.Tx, `outbox/`",
		"good: see [ordering](ordering.md#heads) and [the README](../README.md)",
		"bad file: `outbox/nowhere.go`",
		"bad name: outbox/write.go: Write → NoSuchFunc",
		"bad method: `outbox/write.go: (*Writer).Nope`",
		"bad dir: `outbox/nowhere/`",
		"bad ref: outbox.NoSuchName",
		"bad method ref: (*outbox.Writer).Nope",
		"bad package: nosuchpkg.Name",
		"bad link: [x](nowhere.md)",
		"placeholder: TODO(a name)",
	}, "\n")
	got := checkDoc(root, doc, loadPackages(t, root))
	want := []string{"nowhere.go", "NoSuchFunc", "(*Writer).Nope", "outbox/nowhere/", "NoSuchName", "(*outbox.Writer).Nope", "nosuchpkg", "nowhere.md", "TODO(a name)"}
	if len(got) != len(want) {
		t.Errorf("got %d reports, want %d:\n\t%s", len(got), len(want), strings.Join(got, "\n\t"))
	}
	for i, w := range want {
		line := fmt.Sprintf("%s:%d:", docPath, i+3)
		if !slices.ContainsFunc(got, func(g string) bool { return strings.HasPrefix(g, line) && strings.Contains(g, w) }) {
			t.Errorf("no report %q on line %d; got:\n\t%s", w, i+3, strings.Join(got, "\n\t"))
		}
	}
}

const docPath = "docs/architecture.md"

// checkDoc returns the references of doc (the text of docPath) that do not
// match the tree at root, as "docs/architecture.md:LINE: problem", in line
// order.
func checkDoc(root, doc string, pkgs []*pkg) []string {
	type problem struct {
		line int
		text string
	}
	var bad []problem
	report := func(off int, format string, args ...any) {
		bad = append(bad, problem{1 + strings.Count(doc[:off], "\n"), fmt.Sprintf(format, args...)})
	}
	partOfPath := func(off int, also string) bool {
		return off > 0 && strings.ContainsRune("/.-_"+also+letters, rune(doc[off-1]))
	}

	for _, m := range goPath.FindAllStringSubmatchIndex(doc, -1) {
		start, end := m[2], m[3]
		if partOfPath(start, "") {
			continue // part of a longer path or URL
		}
		path := doc[start:end]
		file, err := parser.ParseFile(token.NewFileSet(), filepath.Join(root, path), nil, parser.SkipObjectResolution)
		if errors.Is(err, fs.ErrNotExist) {
			report(start, "no file %s", path)
			continue
		} else if err != nil {
			report(start, "%s: %v", path, err)
			continue
		}
		declared := fileDecls(file)
		for _, name := range namesAfter(doc[end:]) {
			if !declared[name] {
				report(start, "%s declares no %s", path, name)
			}
		}
	}
	for _, m := range dirSpan.FindAllStringSubmatchIndex(doc, -1) {
		dir := doc[m[2]:m[3]]
		if st, err := os.Stat(filepath.Join(root, dir)); err != nil || !st.IsDir() {
			report(m[0], "no directory %s", dir)
		}
	}
	byName := map[string][]*pkg{}
	for _, p := range pkgs {
		byName[p.name] = append(byName[p.name], p)
	}
	for _, re := range []*regexp.Regexp{ptrMethodRef, pkgRef} {
		for _, m := range re.FindAllStringSubmatchIndex(doc, -1) {
			if partOfPath(m[0], "*") {
				continue // part of a path, or of a (*pkg.T).M checked as such
			}
			ref, pkgName, name := doc[m[0]:m[1]], doc[m[2]:m[3]], doc[m[4]:m[5]]
			method := ""
			if m[6] >= 0 {
				method = doc[m[6]:m[7]]
			}
			cands := byName[pkgName]
			if len(cands) == 0 {
				if !external[pkgName] {
					report(m[0], "%s: no package %s in this module", ref, pkgName)
				}
				continue
			}
			if !slices.ContainsFunc(cands, func(p *pkg) bool { return p.declares(name, method) }) {
				report(m[0], "%s: package %s (%s) declares no %s", ref, pkgName, rel(root, cands[0].dir), strings.TrimSuffix(name+"."+method, "."))
			}
		}
	}
	for _, m := range todo.FindAllStringIndex(doc, -1) {
		report(m[0], "placeholder %s: name it", doc[m[0]:m[1]])
	}
	for _, m := range mdLink.FindAllStringSubmatchIndex(doc, -1) {
		target := doc[m[2]:m[3]]
		if strings.Contains(target, "://") || strings.HasPrefix(target, "#") {
			continue
		}
		target, _, _ = strings.Cut(target, "#")
		if _, err := os.Stat(filepath.Join(root, filepath.Dir(docPath), target)); err != nil {
			report(m[0], "link to %s: no such file", target)
		}
	}
	sort.SliceStable(bad, func(i, j int) bool { return bad[i].line < bad[j].line })
	out := make([]string, len(bad))
	for i, b := range bad {
		out[i] = fmt.Sprintf("%s:%d: %s", docPath, b.line, b.text)
	}
	return out
}

const letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"

var (
	goPath       = regexp.MustCompile(`((?:[a-z0-9_-]+/)+[a-z0-9_]+\.go)\b`)
	dirSpan      = regexp.MustCompile("`((?:[a-z0-9_.-]+/)+)`")
	ptrMethodRef = regexp.MustCompile(`\(\*([a-z][a-z0-9]*)\.([A-Z]\w*)\)\.(\w+)`)
	pkgRef       = regexp.MustCompile(`\b([a-z][a-z0-9]*)\.([A-Z]\w*)(?:\.([A-Z]\w*))?\b`)
	todo         = regexp.MustCompile(`TODO\([^)]*\)`)
	mdLink       = regexp.MustCompile(`\]\(([^)\s]+)\)`)
	nameItem     = regexp.MustCompile(`^(?:\(\*?[A-Za-z_]\w*\)\.[A-Za-z_]\w*|[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?)`)
	nameSep      = regexp.MustCompile(`^[ \t]*(?:,|→|->)[ \t]*`)
)

// external are the packages outside this module that the document may name
// as pkg.Name without the test resolving them.
var external = map[string]bool{
	"pgx": true, "pgxpool": true, "pgconn": true, "amqp": true, "prometheus": true,
	"zap": true, "goose": true, "context": true, "errors": true, "time": true, "sql": true,
	"http": true, "signal": true, "os": true, "embed": true, "river": true, "watermill": true,
}

// namesAfter reads the list of names that follows a path in the document:
// ": a, b → (*T).c". It returns nil when no colon follows the path.
func namesAfter(s string) []string {
	rest, ok := strings.CutPrefix(s, ":")
	if !ok {
		return nil
	}
	rest = strings.TrimLeft(rest, " \t")
	var names []string
	for {
		item := nameItem.FindString(rest)
		if item == "" {
			return names
		}
		if after := rest[len(item):]; strings.HasPrefix(after, "/") || strings.HasPrefix(after, ".go") {
			return names // the next path, not a name
		}
		names = append(names, item)
		rest = rest[len(item):]
		sep := nameSep.FindString(rest)
		if sep == "" {
			return names
		}
		rest = rest[len(sep):]
	}
}

// fileDecls lists what a file declares, methods under their own name and as
// T.M and (*T).M whatever their receiver.
func fileDecls(f *ast.File) map[string]bool {
	out := map[string]bool{}
	for _, decl := range f.Decls {
		switch d := decl.(type) {
		case *ast.FuncDecl:
			out[d.Name.Name] = true
			if d.Recv != nil {
				recv := receiverType(d.Recv.List[0].Type)
				out[recv+"."+d.Name.Name] = true
				out["("+recv+")."+d.Name.Name] = true
				out["(*"+recv+")."+d.Name.Name] = true
			}
		case *ast.GenDecl:
			for _, spec := range d.Specs {
				switch s := spec.(type) {
				case *ast.TypeSpec:
					out[s.Name.Name] = true
				case *ast.ValueSpec:
					for _, n := range s.Names {
						out[n.Name] = true
					}
				}
			}
		}
	}
	return out
}

// receiverType is the name of a method's receiver type, without pointer or
// type parameters.
func receiverType(e ast.Expr) string {
	for {
		switch x := e.(type) {
		case *ast.StarExpr:
			e = x.X
		case *ast.IndexExpr:
			e = x.X
		case *ast.IndexListExpr:
			e = x.X
		case *ast.ParenExpr:
			e = x.X
		case *ast.Ident:
			return x.Name
		default:
			return ""
		}
	}
}

// pkg is one directory's package, with its in-package test files.
type pkg struct {
	dir, name string
	fset      *token.FileSet
	files     []srcFile
}

type srcFile struct {
	ast  *ast.File
	test bool
}

// declares reports whether the package declares name, or, with method set,
// a method or struct field of that name on type name.
func (p *pkg) declares(name, method string) bool {
	for _, f := range p.files {
		decls := fileDecls(f.ast)
		if method == "" && decls[name] || method != "" && decls[name+"."+method] {
			return true
		}
		if method != "" && hasField(f.ast, name, method) {
			return true
		}
	}
	return false
}

func hasField(f *ast.File, typ, field string) bool {
	found := false
	ast.Inspect(f, func(n ast.Node) bool {
		ts, ok := n.(*ast.TypeSpec)
		if !ok || ts.Name.Name != typ {
			return !found
		}
		if st, ok := ts.Type.(*ast.StructType); ok {
			for _, fl := range st.Fields.List {
				for _, n := range fl.Names {
					found = found || n.Name == field
				}
			}
		}
		return false
	})
	return found
}

// loadPackages parses every Go package of the module (skipping testdata and
// hidden directories); external test packages (package x_test) are left out.
func loadPackages(t *testing.T, root string) []*pkg {
	t.Helper()
	byDir := map[string]*pkg{}
	var dirs []string
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if path != root && (d.Name() == "testdata" || d.Name() == "vendor" || strings.HasPrefix(d.Name(), ".") || d.Name() == "node_modules") {
				return filepath.SkipDir
			}
			if path != root {
				if _, err := os.Stat(filepath.Join(path, "go.mod")); err == nil {
					return filepath.SkipDir // another module
				}
			}
			return nil
		}
		if !strings.HasSuffix(d.Name(), ".go") {
			return nil
		}
		dir := filepath.Dir(path)
		p := byDir[dir]
		if p == nil {
			p = &pkg{dir: dir, fset: token.NewFileSet()}
			byDir[dir] = p
			dirs = append(dirs, dir)
		}
		f, err := parser.ParseFile(p.fset, path, nil, parser.ParseComments|parser.SkipObjectResolution)
		if err != nil {
			return err
		}
		test := strings.HasSuffix(d.Name(), "_test.go")
		if test && strings.HasSuffix(f.Name.Name, "_test") {
			return nil
		}
		if p.name == "" || !test {
			p.name = f.Name.Name
		}
		p.files = append(p.files, srcFile{ast: f, test: test})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	var out []*pkg
	for _, d := range dirs {
		if len(byDir[d].files) > 0 {
			out = append(out, byDir[d])
		}
	}
	return out
}

func isSource(name string) bool {
	return strings.HasSuffix(name, ".go") && !strings.HasSuffix(name, "_test.go")
}

func rel(root, path string) string {
	r, err := filepath.Rel(root, path)
	if err != nil {
		return path
	}
	return filepath.ToSlash(r)
}

// moduleRoot is the directory of the go.mod above the test's directory.
func moduleRoot(t *testing.T) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("no go.mod above the test's directory")
		}
		dir = parent
	}
}

// TestUndocumentedFindsMissingDocs runs undocumented on a file with one
// undocumented name of each kind, and documented ones beside them.
func TestUndocumentedFindsMissingDocs(t *testing.T) {
	const src = `package p

// Documented is documented.
func Documented() {}

func Bare() {}

// T is documented.
type T struct{}

func (T) BareMethod() {}

type hidden struct{}

func (hidden) Exported() {} // invisible outside p

type BareType int

// Grouped constants share the group's comment.
const (
	GroupedA = 1
	GroupedB = 2
)

const (
	LineCommented = 1 // a line comment counts
	BareConst     = 2
)

var BareVar, bareVar = 1, 2

func unexported() {}
`
	f, err := parser.ParseFile(token.NewFileSet(), "p.go", src, parser.ParseComments)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, id := range undocumented(f) {
		got = append(got, id.Name)
	}
	want := []string{"Bare", "BareMethod", "BareType", "BareConst", "BareVar"}
	if !slices.Equal(got, want) {
		t.Errorf("undocumented = %v, want %v", got, want)
	}
}
