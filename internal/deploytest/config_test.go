package deploytest

import (
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"gopkg.in/yaml.v3"

	"github.com/outbox-relay/outbox-relay/internal/config"
	"github.com/outbox-relay/outbox-relay/metrics"
)

// deployFiles are the files whose config keys and variables must exist.
func deployFiles(t *testing.T) []string {
	t.Helper()
	out := []string{"Dockerfile", "docs/operations.md"}
	out = append(out, files(t, "deploy/k8s", "")...)
	out = append(out, files(t, "deploy/systemd", "")...)
	out = append(out, files(t, "deploy/compose", "")...)
	return out
}

// docFiles are where a key counts as documented: README.md and docs/*.md.
func docFiles(t *testing.T) []string {
	t.Helper()
	return append([]string{"README.md"}, files(t, "docs", ".md")...)
}

// notKeys are dotted names in the docs that look like configuration keys
// but name something else ("file name"+" "+"name").
var notKeys = map[string]bool{
	// The benchmark report's header fields: a hash of relay/*.go, and the
	// server's version and settings.
	"docs/benchmarks.md relay.source":      true,
	"docs/benchmarks.md postgres.version":  true,
	"docs/benchmarks.md postgres.settings": true,
}

// TestReferencedKeysExist: every OUTBOX_RELAY_* variable and every dotted
// config key that a deployment file, the runbook, the README or docs/
// mentions is a real key.
func TestReferencedKeysExist(t *testing.T) {
	t.Parallel()
	byPath, byEnv := keys()
	seen := map[string]bool{}
	for _, rel := range append(deployFiles(t), append(docFiles(t), "config.example.yaml")...) {
		if seen[rel] {
			continue
		}
		seen[rel] = true
		text := read(t, rel)
		for _, env := range envRefs(text) {
			if _, ok := byEnv[env]; !ok && !config.ServiceLinkName(env) {
				t.Errorf("%s: %s is not a configuration variable (they are OUTBOX_RELAY_ plus a key path of config.example.yaml in capitals)", rel, env)
			}
		}
		for _, path := range keyRefs(text) {
			if _, ok := byPath[path]; !ok && !notKeys[rel+" "+path] {
				t.Errorf("%s: %s is not a configuration key", rel, path)
			}
		}
	}
}

// TestConfigReference: config.example.yaml lists exactly the keys the code
// has, and each of them is documented: its path appears in README.md (its
// configuration table) or in docs/*.md.
func TestConfigReference(t *testing.T) {
	t.Parallel()
	byPath, _ := keys()

	var doc yaml.Node
	if err := yaml.Unmarshal([]byte(read(t, "config.example.yaml")), &doc); err != nil {
		t.Fatalf("config.example.yaml: %v", err)
	}
	example := map[string]bool{}
	var walk func(n *yaml.Node, prefix string)
	walk = func(n *yaml.Node, prefix string) {
		if n.Kind == yaml.DocumentNode {
			for _, c := range n.Content {
				walk(c, prefix)
			}
			return
		}
		if n.Kind != yaml.MappingNode {
			example[prefix] = true
			return
		}
		for i := 0; i+1 < len(n.Content); i += 2 {
			p := n.Content[i].Value
			if prefix != "" {
				p = prefix + "." + p
			}
			walk(n.Content[i+1], p)
		}
	}
	walk(&doc, "")
	for p := range example {
		if _, ok := byPath[p]; !ok {
			t.Errorf("config.example.yaml: %s is not a configuration key", p)
		}
	}
	for p := range byPath {
		if !example[p] {
			t.Errorf("config.example.yaml does not list the key %s", p)
		}
	}

	documented := map[string]bool{}
	for _, rel := range docFiles(t) {
		for _, p := range keyRefs(read(t, rel)) {
			documented[p] = true
		}
	}
	var missing []string
	for _, k := range config.Keys() {
		if !documented[k.Path] {
			missing = append(missing, k.Path)
		}
	}
	if len(missing) > 0 {
		t.Errorf("keys documented nowhere in README.md or docs/*.md: %s", strings.Join(missing, ", "))
	}
}

// TestRunbookNamesExist: the metrics, alerts and links of docs/operations.md
// exist.
func TestRunbookNamesExist(t *testing.T) {
	t.Parallel()
	text := read(t, "docs/operations.md")

	rec := &descRecorder{names: map[string]bool{}}
	if _, err := metrics.New(rec, metrics.Config{}); err != nil {
		t.Fatal(err)
	}
	for _, name := range regexp.MustCompile(`\boutbox_relay_[a-z_]+\b`).FindAllString(text, -1) {
		base := name
		for _, suffix := range []string{"_bucket", "_count", "_sum"} {
			if b, ok := strings.CutSuffix(name, suffix); ok && rec.names[b] {
				base = b
			}
		}
		if !rec.names[base] {
			t.Errorf("docs/operations.md: metric %s does not exist", name)
		}
	}

	alerts := map[string]bool{}
	for _, doc := range yamlDocs(t, "deploy/prometheus/alerts.yml") {
		for _, g := range list(doc, "groups") {
			for _, r := range list(g, "rules") {
				if a := str(r, "alert"); a != "" {
					alerts[a] = true
				}
			}
		}
	}
	for _, name := range regexp.MustCompile(`\bOutboxRelay[A-Z][A-Za-z]+\b`).FindAllString(text, -1) {
		if !alerts[name] {
			t.Errorf("docs/operations.md: alert %s is not in deploy/prometheus/alerts.yml", name)
		}
	}

	// Links: files relative to docs/, and anchors of this page.
	anchors := map[string]bool{}
	for _, h := range regexp.MustCompile(`(?m)^#+ (.+)$`).FindAllStringSubmatch(text, -1) {
		anchors[slug(h[1])] = true
	}
	for _, l := range regexp.MustCompile(`\]\(([^)\s]+)\)`).FindAllStringSubmatch(text, -1) {
		target := l[1]
		if strings.Contains(target, "://") {
			continue
		}
		file, anchor, _ := strings.Cut(target, "#")
		if file == "" {
			if !anchors[anchor] {
				t.Errorf("docs/operations.md: link %s: no such section", target)
			}
			continue
		}
		if !exists(t, filepath.ToSlash(filepath.Join("docs", file))) {
			t.Errorf("docs/operations.md: link %s: no such file", target)
		}
	}
}

// slug is GitHub's anchor for a heading.
func slug(h string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(h) {
		switch {
		case r == ' ':
			b.WriteRune('-')
		case r == '-' || r == '_' || r >= 'a' && r <= 'z' || r >= '0' && r <= '9':
			b.WriteRune(r)
		}
	}
	return b.String()
}

// descRecorder is a prometheus.Registerer that records metric names.
type descRecorder struct{ names map[string]bool }

var fqName = regexp.MustCompile(`fqName: "([^"]+)"`)

func (d *descRecorder) Register(c prometheus.Collector) error {
	ch := make(chan *prometheus.Desc, 16)
	go func() { c.Describe(ch); close(ch) }()
	for desc := range ch {
		if m := fqName.FindStringSubmatch(desc.String()); m != nil {
			d.names[m[1]] = true
		}
	}
	return nil
}

func (d *descRecorder) MustRegister(cs ...prometheus.Collector) {
	for _, c := range cs {
		_ = d.Register(c)
	}
}

func (d *descRecorder) Unregister(prometheus.Collector) bool { return true }

func TestKeyRefs(t *testing.T) {
	t.Parallel()
	got := keyRefs("`relay.shutdown_timeout` and relay.on_dispatch: delete, not docs/metrics.md, " +
		"outbox-relay.service, relay.New(cfg), relay.yaml or metrics.NewServer; (wake.mode), " +
		"logger relay.amqp, `relay.bogus: unknown key (line 5)`")
	want := []string{"relay.shutdown_timeout", "relay.on_dispatch", "wake.mode"}
	sort.Strings(got)
	sort.Strings(want)
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Errorf("keyRefs = %v, want %v", got, want)
	}
}
