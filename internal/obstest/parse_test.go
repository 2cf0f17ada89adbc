package obstest_test

import (
	"slices"
	"sort"
	"testing"

	"github.com/outbox-relay/outbox-relay/internal/obstest"
)

func TestExprMetricNames(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		expr string
		want []string
	}{
		{`up{job="outbox-relay"} == 0 or absent(up{job="outbox-relay"})`, []string{"up"}},
		{`histogram_quantile(0.99, sum by (le) (rate(outbox_relay_end_to_end_latency_seconds_bucket{job=~"$job", instance=~"$instance"}[$__rate_interval])))`,
			[]string{"outbox_relay_end_to_end_latency_seconds_bucket"}},
		{`sum(rate(a_total[5m])) by (event_type, reason) / on (job) group_left (version) b_info`, []string{"a_total", "b_info"}},
		{`sum without (event_type, reason) (rate(x_total[5m])) / (sum without (event_type) (rate(y_total[5m])) or x_total * 0) > 0.05`,
			[]string{"x_total", "y_total"}},
		{`max_over_time(rate(c_total[1m])[10m:30s]) offset 5m > bool 1e3`, []string{"c_total"}},
		{`label_replace(d, "dst", "$1", "src", "(.*)") unless e`, []string{"d", "e"}},
		{`count_values("version", f{go_version="go1.26"}) + topk(5, g) - time()`, []string{"f", "g"}},
		{`vector(1) + scalar(h:rate5m)`, []string{"h:rate5m"}},
	} {
		got := obstest.ExprMetricNames(c.expr)
		if !slices.Equal(got, c.want) {
			t.Errorf("ExprMetricNames(%q)\n got %v\nwant %v", c.expr, got, c.want)
		}
	}
}

func TestParseExposition(t *testing.T) {
	t.Parallel()
	text := `# HELP a_total Counts.
# TYPE a_total counter
a_total{event_type="x",reason="n\"a,ck"} 3
a_total{event_type="y",reason="}"} 1
# HELP lat_seconds Latency.
# TYPE lat_seconds histogram
lat_seconds_bucket{le="0.1"} 1
lat_seconds_bucket{le="+Inf"} 2
lat_seconds_sum 0.3
lat_seconds_count 2
# TYPE g gauge
g 1.5e+06 1700000000000
`
	fams, err := obstest.ParseExposition(text)
	if err != nil {
		t.Fatal(err)
	}
	check := func(name, typ string, labels, samples []string) {
		t.Helper()
		f := fams[name]
		if f == nil {
			t.Fatalf("family %s missing; got %v", name, fams)
		}
		keys := func(m map[string]bool) []string {
			var out []string
			for k := range m {
				out = append(out, k)
			}
			sort.Strings(out)
			return out
		}
		if f.Type != typ || !slices.Equal(keys(f.Labels), labels) || !slices.Equal(keys(f.Samples), samples) {
			t.Errorf("%s: type %s labels %v samples %v; want %s %v %v", name, f.Type, keys(f.Labels), keys(f.Samples), typ, labels, samples)
		}
	}
	check("a_total", "counter", []string{"event_type", "reason"}, []string{"a_total"})
	check("lat_seconds", "histogram", nil, []string{"lat_seconds_bucket", "lat_seconds_count", "lat_seconds_sum"})
	check("g", "gauge", nil, []string{"g"})
	if len(fams) != 3 {
		t.Errorf("%d families, want 3: %v", len(fams), fams)
	}

	for _, bad := range []string{`x{a="1} 2`, `x{a=1} 2`, `x{a="1"}`, `{a="1"} 2`} {
		if _, err := obstest.ParseExposition(bad + "\n"); err == nil {
			t.Errorf("ParseExposition(%q) succeeded; want an error", bad)
		}
	}
}
