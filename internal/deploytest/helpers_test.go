package deploytest

import (
	"errors"
	"io"
	"io/fs"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/outbox-relay/outbox-relay/internal/config"
	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

// root is the repository root, two levels above this package.
func root(t testing.TB) string {
	t.Helper()
	dir, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "go.mod")); err != nil {
		t.Fatalf("repository root not found at %s: %v", dir, err)
	}
	return dir
}

// read returns the file at rel (relative to the repository root).
func read(t testing.TB, rel string) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(root(t), filepath.FromSlash(rel)))
	if err != nil {
		t.Fatalf("read %s: %v", rel, err)
	}
	return string(data)
}

// exists reports whether rel (relative to the repository root) exists.
func exists(t testing.TB, rel string) bool {
	t.Helper()
	_, err := os.Stat(filepath.Join(root(t), filepath.FromSlash(rel)))
	return err == nil
}

// files lists the regular files under dir (relative to the root) whose
// names end in one of exts ("" for all), as slash paths relative to the root.
func files(t testing.TB, dir string, exts ...string) []string {
	t.Helper()
	base := root(t)
	var out []string
	err := filepath.WalkDir(filepath.Join(base, filepath.FromSlash(dir)), func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		for _, e := range exts {
			if e == "" || strings.HasSuffix(p, e) {
				rel, _ := filepath.Rel(base, p)
				out = append(out, filepath.ToSlash(rel))
				break
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("walk %s: %v", dir, err)
	}
	sort.Strings(out)
	return out
}

// keys returns the configuration keys by path and by environment name.
func keys() (byPath, byEnv map[string]config.Key) {
	byPath, byEnv = map[string]config.Key{}, map[string]config.Key{}
	for _, k := range config.Keys() {
		byPath[k.Path] = k
		byEnv[k.Env] = k
	}
	for _, env := range config.ExtraEnv() {
		byEnv[env] = config.Key{Env: env, Kind: "string"}
	}
	return byPath, byEnv
}

// sections are the top-level configuration sections (postgres, amqp, ...).
func sections() []string {
	seen := map[string]bool{}
	var out []string
	for _, k := range config.Keys() {
		s, _, _ := strings.Cut(k.Path, ".")
		if !seen[s] {
			seen[s] = true
			out = append(out, s)
		}
	}
	return out
}

var envRef = regexp.MustCompile(`\bOUTBOX_RELAY_[A-Z0-9_]*[A-Z0-9]\b`)

// envRefs returns the OUTBOX_RELAY_* names text mentions.
func envRefs(text string) []string { return envRef.FindAllString(text, -1) }

// fileExtensions are what a "section.word" token is when it is a file name
// (relay.yaml, metrics.md), not a configuration key.
var fileExtensions = map[string]bool{
	"md": true, "go": true, "yaml": true, "yml": true, "json": true, "sql": true,
	"service": true, "env": true, "txt": true, "sh": true, "conf": true, "html": true, "pem": true,
}

// keyRefs returns the dotted configuration key paths text mentions, such as
// relay.shutdown_timeout: a section name, a dot and a lowercase word, not
// preceded by a word character, dot, slash or dash (outbox-relay.service,
// docs/metrics.md), not a file name, not a logger name (relay.amqp: no key
// is named after a section) and not quoted in an "unknown key" error.
func keyRefs(text string) []string {
	re := regexp.MustCompile(`(` + strings.Join(sections(), "|") + `)\.([a-z][a-z0-9_]*)`)
	secs := map[string]bool{}
	for _, s := range sections() {
		secs[s] = true
	}
	var out []string
	for _, m := range re.FindAllStringSubmatchIndex(text, -1) {
		start, end := m[0], m[1]
		if start > 0 {
			if c := text[start-1]; isWord(c) || c == '.' || c == '/' || c == '-' {
				continue
			}
		}
		if end < len(text) && (isWord(text[end]) || text[end] == '(') {
			continue // relay.New, metrics.NewServer(...: Go identifiers
		}
		if fileExtensions[text[m[4]:m[5]]] || secs[text[m[4]:m[5]]] {
			continue // a file name, or a logger name such as relay.amqp
		}
		if strings.HasPrefix(text[end:], ": unknown key") {
			continue // quoting the error for a key that does not exist
		}
		out = append(out, text[start:end])
	}
	return out
}

func isWord(c byte) bool {
	return c == '_' || c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z'
}

// yamlDocs decodes every document of a YAML stream into generic maps.
func yamlDocs(t testing.TB, rel string) []map[string]any {
	t.Helper()
	dec := yaml.NewDecoder(strings.NewReader(read(t, rel)))
	var docs []map[string]any
	for {
		var doc map[string]any
		err := dec.Decode(&doc)
		if errors.Is(err, io.EOF) {
			return docs
		}
		if err != nil {
			t.Fatalf("%s: %v", rel, err)
		}
		if doc != nil {
			docs = append(docs, doc)
		}
	}
}

// get walks a decoded YAML value by map keys and list indexes ("0").
func get(v any, path ...string) any {
	for _, p := range path {
		switch x := v.(type) {
		case map[string]any:
			v = x[p]
		case []any:
			i := 0
			for _, c := range p {
				i = i*10 + int(c-'0')
			}
			if i >= len(x) {
				return nil
			}
			v = x[i]
		default:
			return nil
		}
	}
	return v
}

func str(v any, path ...string) string {
	s, _ := get(v, path...).(string)
	return s
}

func list(v any, path ...string) []any {
	l, _ := get(v, path...).([]any)
	return l
}

func mapping(v any, path ...string) map[string]any {
	m, _ := get(v, path...).(map[string]any)
	return m
}

func strs(v []any) []string {
	out := make([]string, 0, len(v))
	for _, x := range v {
		s, _ := x.(string)
		out = append(out, s)
	}
	return out
}

// parseConfig parses a configuration file strictly, as the relay does
// (unknown keys are errors), and applies environ and the defaults.
func parseConfig(t testing.TB, name, text string, environ []string) config.File {
	t.Helper()
	var f config.File
	if err := config.Parse([]byte(text), &f); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	path := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := config.Load(path, environ)
	if err != nil {
		t.Fatalf("%s with its environment: %v", name, err)
	}
	return f
}

// validate checks a loaded configuration as `outbox-relay run` does.
// PostgreSQL CA files named in the DSN (sslrootcert) exist only where the
// relay is deployed, so they are replaced by a real CA file here.
func validate(t testing.TB, name string, f config.File) {
	t.Helper()
	f.Postgres.DSN = withTestCA(t, f.Postgres.DSN)
	if err := f.Validate(); err != nil {
		t.Errorf("%s: the configuration is not valid:\n%v", name, err)
	}
}

// metricsPort is the port of the default metrics.addr (":9464").
func metricsPort(t testing.TB) string {
	t.Helper()
	_, port, err := net.SplitHostPort(config.File{}.WithDefaults().Metrics.Addr)
	if err != nil {
		t.Fatal(err)
	}
	return port
}

// addrPort is the port of a metrics.addr value.
func addrPort(t testing.TB, addr string) string {
	t.Helper()
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("metrics.addr %q: %v", addr, err)
	}
	return port
}

// withTestCA replaces the sslrootcert of a postgres DSN (URL form) by the
// certificate of a CA made for the test, and returns the DSN unchanged
// otherwise.
func withTestCA(t testing.TB, dsn string) string {
	t.Helper()
	u, err := url.Parse(dsn)
	if err != nil || u.Query().Get("sslrootcert") == "" {
		return dsn
	}
	q := u.Query()
	q.Set("sslrootcert", testenv.NewTLS(t, "deploytest").CA)
	u.RawQuery = q.Encode()
	return u.String()
}

// expandDefaults expands compose-style ${VAR:-default} and ${VAR} references
// with their defaults (or "x"), as a stack started without overrides sees them.
func expandDefaults(s string) string {
	re := regexp.MustCompile(`\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}`)
	return re.ReplaceAllStringFunc(s, func(m string) string {
		sub := re.FindStringSubmatch(m)
		if sub[2] != "" {
			return sub[2]
		}
		return "x"
	})
}

// duration parses a Go duration or a systemd time span such as "45s",
// "1min 30s" or "2min".
func duration(t testing.TB, s string) time.Duration {
	t.Helper()
	s = strings.ReplaceAll(strings.ReplaceAll(s, "min", "m"), " ", "")
	if s != "" && strings.Trim(s, "0123456789") == "" {
		s += "s" // systemd: a bare number is seconds
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		t.Fatalf("duration %q: %v", s, err)
	}
	return d
}

// queryParam returns a query parameter of a URL ("" if none or not a URL).
func queryParam(rawURL, name string) string {
	u, err := url.Parse(rawURL)
	if err != nil {
		return ""
	}
	return u.Query().Get(name)
}
