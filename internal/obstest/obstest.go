// Package obstest checks that the observability files shipped under deploy/
// and docs/ fit the metrics the relay really exports: the Grafana dashboard
// and the Prometheus alert rules name only metrics a running relay serves,
// docs/metrics.md documents exactly those metrics, the alert rules pass their
// promtool unit tests, and a real Prometheus scraping a relay sees events
// flow and the backlog alert fire during a broker outage and resolve after.
//
// The tests need promtool and prometheus (Debian package prometheus, which
// `scripts/services.sh up` installs): they fail, not skip, without them.
//
// This file holds the small parsers the tests share; metrics/metrics_test.go
// uses ParseMetricsDoc too.
package obstest

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"regexp"
	"sort"
	"strings"

	"gopkg.in/yaml.v3"
)

// DocMetric is one row of the table in docs/metrics.md.
type DocMetric struct {
	Type   string   // counter, gauge, histogram or summary
	Labels []string // sorted; nil when the row says —
}

var backticked = regexp.MustCompile("`([^`]+)`")

// ParseMetricsDoc reads the metrics table of docs/metrics.md: every row whose
// first cell is a backticked metric name, with its type and labels columns.
func ParseMetricsDoc(path string) (map[string]DocMetric, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	out := map[string]DocMetric{}
	sc := bufio.NewScanner(f)
	line := 0
	for sc.Scan() {
		line++
		text := strings.TrimSpace(sc.Text())
		if !strings.HasPrefix(text, "| `") {
			continue
		}
		cells := strings.Split(strings.Trim(text, "|"), "|")
		if len(cells) != 4 {
			continue // another table (label values)
		}
		name := strings.Trim(strings.TrimSpace(cells[0]), "`")
		if !strings.Contains(name, "_") || strings.ContainsAny(name, " `") {
			return nil, fmt.Errorf("%s:%d: first cell %q is not one metric name", path, line, cells[0])
		}
		if _, dup := out[name]; dup {
			return nil, fmt.Errorf("%s:%d: %s documented twice", path, line, name)
		}
		m := DocMetric{Type: strings.TrimSpace(cells[1])}
		for _, l := range backticked.FindAllStringSubmatch(cells[2], -1) {
			m.Labels = append(m.Labels, l[1])
		}
		sort.Strings(m.Labels)
		out[name] = m
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s: no metric rows found (| `name` | type | labels | meaning |)", path)
	}
	return out, nil
}

// Grafana variables and PromQL pieces that are not metric names.
var (
	grafanaVar   = regexp.MustCompile(`\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*`)
	stringLit    = regexp.MustCompile(`"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|` + "`[^`]*`")
	braces       = regexp.MustCompile(`\{[^{}]*\}`)
	brackets     = regexp.MustCompile(`\[[^\[\]]*\]`)
	grouping     = regexp.MustCompile(`\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)`)
	identifier   = regexp.MustCompile(`[A-Za-z_:][A-Za-z0-9_:]*`)
	promqlKeywds = map[string]bool{
		"and": true, "or": true, "unless": true, "bool": true, "offset": true, "by": true,
		"without": true, "on": true, "ignoring": true, "group_left": true, "group_right": true,
		"atan2": true, "inf": true, "nan": true, "Inf": true, "NaN": true,
	}
)

// ExprMetricNames returns the metric names a PromQL expression selects,
// sorted and without duplicates. It is a lexer, not a parser: it drops
// Grafana variables, strings, label matchers, ranges and grouping label
// lists, then keeps the identifiers that are not functions, aggregations or
// keywords. Prometheus itself checks the syntax (see the tests).
func ExprMetricNames(expr string) []string {
	s := grafanaVar.ReplaceAllString(expr, "")
	s = stringLit.ReplaceAllString(s, `""`)
	s = braces.ReplaceAllString(s, " ")
	for brackets.MatchString(s) { // subqueries may nest ranges
		s = brackets.ReplaceAllString(s, " ")
	}
	s = grouping.ReplaceAllString(s, " ")
	seen := map[string]bool{}
	for _, loc := range identifier.FindAllStringIndex(s, -1) {
		start, end := loc[0], loc[1]
		if start > 0 && strings.ContainsAny(s[start-1:start], "0123456789.") {
			continue // part of a number or duration: 1e3, 5m
		}
		name := s[start:end]
		if promqlKeywds[name] {
			continue
		}
		if rest := strings.TrimLeft(s[end:], " \t\n"); strings.HasPrefix(rest, "(") {
			continue // function or aggregation
		}
		seen[name] = true
	}
	names := make([]string, 0, len(seen))
	for n := range seen {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// DashboardQuery is one PromQL query of a Grafana dashboard.
type DashboardQuery struct {
	Where string // panel title or variable name, for messages
	Expr  string // as written, with Grafana variables
}

var labelValues = regexp.MustCompile(`^\s*label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*$`)

// DashboardQueries returns the PromQL of every panel target and every query
// variable of a Grafana dashboard JSON file; a label_values(selector, label)
// variable contributes its selector.
func DashboardQueries(path string) ([]DashboardQuery, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var d struct {
		Panels     []json.RawMessage `json:"panels"`
		Templating struct {
			List []struct {
				Name  string          `json:"name"`
				Type  string          `json:"type"`
				Query json.RawMessage `json:"query"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(b, &d); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	var out []DashboardQuery
	var walk func(raw json.RawMessage) error
	walk = func(raw json.RawMessage) error {
		var p struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
			Panels []json.RawMessage `json:"panels"` // collapsed rows
		}
		if err := json.Unmarshal(raw, &p); err != nil {
			return err
		}
		for _, t := range p.Targets {
			if t.Expr != "" {
				out = append(out, DashboardQuery{Where: "panel " + p.Title, Expr: t.Expr})
			}
		}
		for _, c := range p.Panels {
			if err := walk(c); err != nil {
				return err
			}
		}
		return nil
	}
	for _, p := range d.Panels {
		if err := walk(p); err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
	}
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		var q string
		if err := json.Unmarshal(v.Query, &q); err != nil {
			var obj struct {
				Query string `json:"query"`
			}
			if err := json.Unmarshal(v.Query, &obj); err != nil {
				return nil, fmt.Errorf("%s: variable %s: query is neither a string nor an object", path, v.Name)
			}
			q = obj.Query
		}
		if m := labelValues.FindStringSubmatch(q); m != nil {
			q = m[1]
		}
		out = append(out, DashboardQuery{Where: "variable " + v.Name, Expr: q})
	}
	return out, nil
}

// Rule is one alerting or recording rule of a Prometheus rules file.
type Rule struct {
	Alert  string            `yaml:"alert,omitempty"`
	Record string            `yaml:"record,omitempty"`
	Expr   string            `yaml:"expr"`
	For    string            `yaml:"for,omitempty"`
	Labels map[string]string `yaml:"labels,omitempty"`
	Annot  map[string]string `yaml:"annotations,omitempty"`
}

// RuleFile is a Prometheus rules file.
type RuleFile struct {
	Groups []struct {
		Name     string `yaml:"name"`
		Interval string `yaml:"interval,omitempty"`
		Rules    []Rule `yaml:"rules"`
	} `yaml:"groups"`
}

// ReadRules parses a Prometheus rules file.
func ReadRules(path string) (*RuleFile, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var f RuleFile
	dec := yaml.NewDecoder(strings.NewReader(string(b)))
	dec.KnownFields(true)
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &f, nil
}

// Family is one metric family of a /metrics page in the text format.
type Family struct {
	Type    string          // from # TYPE; "untyped" when absent
	Labels  map[string]bool // label names over all its samples, le and quantile excluded
	Samples map[string]bool // sample names: the family name, or name_bucket, name_sum, name_count
}

// ParseExposition reads a /metrics page in the Prometheus text format (what
// promhttp serves without content negotiation) into its families by name.
func ParseExposition(text string) (map[string]*Family, error) {
	out := map[string]*Family{}
	family := func(name string) *Family {
		f := out[name]
		if f == nil {
			f = &Family{Type: "untyped", Labels: map[string]bool{}, Samples: map[string]bool{}}
			out[name] = f
		}
		return f
	}
	for i, line := range strings.Split(text, "\n") {
		if line == "" {
			continue
		}
		if strings.HasPrefix(line, "#") {
			if fields := strings.Fields(line); len(fields) == 4 && fields[1] == "TYPE" {
				family(fields[2]).Type = fields[3]
			}
			continue
		}
		name, labels, err := parseSample(line)
		if err != nil {
			return nil, fmt.Errorf("line %d: %w: %q", i+1, err, line)
		}
		f := out[name]
		if f == nil {
			for _, suffix := range []string{"_bucket", "_sum", "_count"} {
				if base, ok := strings.CutSuffix(name, suffix); ok && out[base] != nil {
					f = out[base]
					break
				}
			}
		}
		if f == nil {
			f = family(name)
		}
		f.Samples[name] = true
		for _, l := range labels {
			if l != "le" && l != "quantile" {
				f.Labels[l] = true
			}
		}
	}
	return out, nil
}

// parseSample splits `name{a="x",b="y"} value [timestamp]` into the name and
// the label names.
func parseSample(line string) (string, []string, error) {
	end := strings.IndexAny(line, "{ ")
	if end <= 0 {
		return "", nil, errors.New("no metric name")
	}
	name, rest := line[:end], line[end:]
	var labels []string
	if strings.HasPrefix(rest, "{") {
		rest = rest[1:]
		for {
			rest = strings.TrimLeft(rest, ", ")
			if strings.HasPrefix(rest, "}") {
				rest = rest[1:]
				break
			}
			eq := strings.Index(rest, "=")
			if eq <= 0 || len(rest) < eq+2 || rest[eq+1] != '"' {
				return "", nil, errors.New("malformed label")
			}
			labels = append(labels, strings.TrimSpace(rest[:eq]))
			rest = rest[eq+2:]
			closed := false
			for j := 0; j < len(rest); j++ {
				if rest[j] == '\\' {
					j++
					continue
				}
				if rest[j] == '"' {
					rest, closed = rest[j+1:], true
					break
				}
			}
			if !closed {
				return "", nil, errors.New("unterminated label value")
			}
		}
	}
	if len(strings.Fields(rest)) == 0 {
		return "", nil, errors.New("no value")
	}
	return name, labels, nil
}
