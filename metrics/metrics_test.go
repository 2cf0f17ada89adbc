package metrics_test

import (
	"context"
	"errors"
	"io"
	"net/http"
	"regexp"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	dto "github.com/prometheus/client_model/go"

	"github.com/outbox-relay/outbox-relay/internal/obstest"
	"github.com/outbox-relay/outbox-relay/metrics"
)

// recorder is a registry that remembers what was registered on it.
type recorder struct {
	*prometheus.Registry
	collectors []prometheus.Collector
}

func (r *recorder) Register(c prometheus.Collector) error {
	r.collectors = append(r.collectors, c)
	return r.Registry.Register(c)
}

var (
	descName   = regexp.MustCompile(`fqName: "([^"]*)"`)
	descHelp   = regexp.MustCompile(`help: "((?:[^"\\]|\\.)*)"`)
	descLabels = regexp.MustCompile(`(?:constLabels|variableLabels): \{([^}]*)\}`)
)

// registered describes one metric family that metrics.New registers,
// whether or not it has series yet.
type registered struct {
	typ    string
	labels []string
	help   string
}

// registeredMetrics returns every metric family metrics.New registers, read
// from the collectors' descriptors, so vectors without children count too.
func registeredMetrics(t *testing.T) map[string]registered {
	t.Helper()
	rec := &recorder{Registry: prometheus.NewRegistry()}
	m, err := metrics.New(rec, metrics.Config{Version: "v0.0.0-test", Commit: "abc1234"})
	if err != nil {
		t.Fatal(err)
	}
	m.SetTableStatsHeld(true) // else the table-wide gauges collect nothing to type
	out := map[string]registered{}
	for _, c := range rec.collectors {
		typ := collectorType(t, c)
		descs := make(chan *prometheus.Desc, 16)
		c.Describe(descs)
		close(descs)
		for d := range descs {
			s := d.String()
			name := descName.FindStringSubmatch(s)
			if name == nil {
				t.Fatalf("cannot read the name from descriptor %s", s)
			}
			r := registered{typ: typ}
			if h := descHelp.FindStringSubmatch(s); h != nil {
				r.help = h[1]
			}
			for _, group := range descLabels.FindAllStringSubmatch(s, -1) {
				for _, l := range strings.Split(group[1], ",") {
					l, _, _ = strings.Cut(l, "=") // const label name=value
					l = strings.TrimSuffix(strings.TrimPrefix(l, "c("), ")")
					if l != "" {
						r.labels = append(r.labels, l)
					}
				}
			}
			sort.Strings(r.labels)
			out[name[1]] = r
		}
	}
	if len(out) == 0 {
		t.Fatal("metrics.New registered nothing")
	}
	return out
}

// collectorType is the Prometheus type of the metrics a collector yields.
func collectorType(t *testing.T, c prometheus.Collector) string {
	t.Helper()
	switch c.(type) {
	case *prometheus.CounterVec:
		return "counter"
	case *prometheus.GaugeVec:
		return "gauge"
	case *prometheus.HistogramVec:
		return "histogram"
	case *prometheus.SummaryVec:
		return "summary"
	}
	ch := make(chan prometheus.Metric, 1)
	go func() { c.Collect(ch); close(ch) }()
	for m := range ch {
		var pb dto.Metric
		if err := m.Write(&pb); err != nil {
			t.Fatal(err)
		}
		for range ch { // drain
		}
		switch {
		case pb.Counter != nil:
			return "counter"
		case pb.Gauge != nil:
			return "gauge"
		case pb.Histogram != nil:
			return "histogram"
		case pb.Summary != nil:
			return "summary"
		}
		break
	}
	t.Fatalf("cannot tell the type of collector %T", c)
	return ""
}

// TestMetricsDocumented keeps docs/metrics.md in step with metrics.New:
// every registered metric has a row with its type and labels, and every row
// names a registered metric.
func TestMetricsDocumented(t *testing.T) {
	t.Parallel()
	got := registeredMetrics(t)
	doc, err := obstest.ParseMetricsDoc("../docs/metrics.md")
	if err != nil {
		t.Fatal(err)
	}
	for name, r := range got {
		d, ok := doc[name]
		if !ok {
			t.Errorf("%s (%s, labels %v) is not documented in docs/metrics.md: add a row to its table", name, r.typ, r.labels)
			continue
		}
		if d.Type != r.typ {
			t.Errorf("docs/metrics.md: %s is documented as a %s, but it is a %s", name, d.Type, r.typ)
		}
		if !slices.Equal(d.Labels, r.labels) {
			t.Errorf("docs/metrics.md: %s is documented with labels %v, but has %v", name, d.Labels, r.labels)
		}
	}
	for name := range doc {
		if _, ok := got[name]; !ok {
			t.Errorf("docs/metrics.md documents %s, which metrics.New does not register: remove or rename the row", name)
		}
	}
}

// TestMetricNames checks the naming conventions of STYLE.md and runs
// client_golang's linter (the rules of `promtool check metrics`) over every
// family, with a child created for each labelled vector.
func TestMetricNames(t *testing.T) {
	t.Parallel()
	for name, r := range registeredMetrics(t) {
		if !strings.HasPrefix(name, "outbox_relay_") {
			t.Errorf("%s: missing the outbox_relay_ prefix", name)
		}
		if (r.typ == "counter") != strings.HasSuffix(name, "_total") {
			t.Errorf("%s: a %s; counters and only counters end in _total", name, r.typ)
		}
		if strings.TrimSpace(r.help) == "" {
			t.Errorf("%s: no help text", name)
		}
		for _, l := range r.labels {
			if l == "id" || strings.HasSuffix(l, "_id") {
				t.Errorf("%s: label %q looks like an id: label values must come from a bounded set", name, l)
			}
		}
	}

	reg := prometheus.NewRegistry()
	m, err := metrics.New(reg, metrics.Config{})
	if err != nil {
		t.Fatal(err)
	}
	m.Published.WithLabelValues("a").Inc()
	m.Failed.WithLabelValues("a", "nack").Inc()
	m.Returned.WithLabelValues("a").Inc()
	m.Dead.WithLabelValues("a", "too_large").Inc()
	m.Retries.WithLabelValues("a").Inc()
	m.Cleaned.WithLabelValues(metrics.CleanDead).Inc()
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	problems, err := promlint.NewWithMetricFamilies(families).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}
}

// TestCreatedUpFront checks that the series of the fixed label sets exist at
// zero before anything happened, and the build info carries the versions.
func TestCreatedUpFront(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewRegistry()
	if _, err := metrics.New(reg, metrics.Config{Version: "v1.2.3", Commit: "deadbeef"}); err != nil {
		t.Fatal(err)
	}
	series, values := gather(t, reg)
	// outbox_relay_link_up is left out: which links exist depends on the
	// relay's wake mode (listen only in notify mode).
	want := map[string][]string{
		"outbox_relay_reconnects_total":       {"link=amqp", "link=listen", "link=postgres"},
		"outbox_relay_wakeups_total":          {"source=notify", "source=poll", "source=reconnect"},
		"outbox_relay_stage_duration_seconds": {"stage=claim", "stage=mark", "stage=publish"},
		"outbox_relay_rows_cleaned_total":     {"kind=dead", "kind=dispatched"},
		"outbox_relay_build_info":             {"commit=deadbeef,go_version=" + runtime.Version() + ",version=v1.2.3"},
	}
	for name, w := range want {
		got := series[name]
		sort.Strings(got)
		if !slices.Equal(got, w) {
			t.Errorf("%s: series %v, want %v", name, got, w)
		}
	}
	for _, name := range []string{"outbox_relay_end_to_end_latency_seconds", "outbox_relay_publish_confirm_seconds",
		"outbox_relay_batch_size", "outbox_relay_batch_duration_seconds", "outbox_relay_partitions_owned",
		"outbox_relay_commit_horizon_wait_seconds"} {
		if len(series[name]) != 1 {
			t.Errorf("%s: %d series before anything happened, want 1", name, len(series[name]))
		}
	}
	if v := values["outbox_relay_build_info"]; v != 1 {
		t.Errorf("outbox_relay_build_info = %v, want 1", v)
	}
}

// TestTableWideGaugesWithLease checks that the table-wide gauges exist only
// on the replica that holds the stats lease (alerts on them fire once per
// table), at zero from then on.
func TestTableWideGaugesWithLease(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewRegistry()
	m, err := metrics.New(reg, metrics.Config{Version: "v1.2.3", Commit: "deadbeef"})
	if err != nil {
		t.Fatal(err)
	}
	series, values := gather(t, reg)
	tableWide := []string{"outbox_relay_pending_events", "outbox_relay_oldest_pending_age_seconds", "outbox_relay_dead_events",
		"outbox_relay_delayed_events", "outbox_relay_table_stats_timestamp_seconds"}
	for _, name := range tableWide {
		if len(series[name]) != 0 {
			t.Errorf("%s: exported before this replica holds the stats lease", name)
		}
	}
	if v, ok := values["outbox_relay_table_stats_leader"]; !ok || v != 0 {
		t.Errorf("outbox_relay_table_stats_leader = %v (present %v), want 0", v, ok)
	}
	m.SetTableStatsHeld(true)
	series, _ = gather(t, reg)
	for _, name := range tableWide {
		if len(series[name]) != 1 {
			t.Errorf("%s: %d series while holding the stats lease, want 1", name, len(series[name]))
		}
	}
}

// gather returns, per family registered on reg, the label sets of its
// series ("name=value,..."), and the gauge value of its last series.
func gather(t *testing.T, reg prometheus.Gatherer) (series map[string][]string, values map[string]float64) {
	t.Helper()
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	series, values = map[string][]string{}, map[string]float64{}
	for _, f := range families {
		for _, m := range f.GetMetric() {
			values[f.GetName()] = m.GetGauge().GetValue()
			var vals []string
			for _, l := range m.GetLabel() {
				vals = append(vals, l.GetName()+"="+l.GetValue())
			}
			series[f.GetName()] = append(series[f.GetName()], strings.Join(vals, ","))
		}
	}
	return series, values
}

// TestEventTypeCap checks that event types beyond MaxEventTypes fold into
// "other" and that known types keep their label.
func TestEventTypeCap(t *testing.T) {
	t.Parallel()
	m, err := metrics.New(prometheus.NewRegistry(), metrics.Config{MaxEventTypes: 2})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ in, want string }{
		{"a", "a"}, {"b", "b"}, {"c", metrics.OtherEventType}, {"a", "a"}, {"d", metrics.OtherEventType}, {"b", "b"},
	} {
		if got := m.EventType(c.in); got != c.want {
			t.Errorf("EventType(%q) = %q, want %q", c.in, got, c.want)
		}
	}

	m, err = metrics.New(prometheus.NewRegistry(), metrics.Config{}) // default cap 100
	if err != nil {
		t.Fatal(err)
	}
	for i := range 100 {
		if got := m.EventType(string(rune('A'+i%26)) + strings.Repeat("x", i)); got == metrics.OtherEventType {
			t.Fatalf("type %d folded into other; the default cap is 100", i)
		}
	}
	if got := m.EventType("one.too.many"); got != metrics.OtherEventType {
		t.Errorf("the 101st type got label %q, want %q", got, metrics.OtherEventType)
	}
}

func TestRegisterTwice(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewRegistry()
	if _, err := metrics.New(reg, metrics.Config{}); err != nil {
		t.Fatal(err)
	}
	if _, err := metrics.New(reg, metrics.Config{}); err == nil {
		t.Fatal("registering the metrics twice on one registry succeeded; want an error")
	}
}

// TestServer checks /metrics, /healthz and /readyz.
func TestServer(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewRegistry()
	if _, err := metrics.New(reg, metrics.Config{Version: "v9"}); err != nil {
		t.Fatal(err)
	}
	var notReady atomic.Pointer[error]
	srv := serve(t, reg, func() error {
		if e := notReady.Load(); e != nil {
			return *e
		}
		return nil
	})
	if code, body := httpGet(t, srv, "/healthz"); code != http.StatusOK || body != "ok\n" {
		t.Errorf("/healthz: %d %q, want 200 \"ok\\n\"", code, body)
	}
	if code, body := httpGet(t, srv, "/readyz"); code != http.StatusOK {
		t.Errorf("/readyz while ready: %d %q, want 200", code, body)
	}
	// /readyz names what is down but not the errors' text (hosts, users).
	cause := errors.Join(
		publicError{"postgres link down", "postgres: dial tcp 10.1.2.3:5432: user relay"},
		errors.New("amqp: dial amqp://relay@mq.internal:5672/"))
	notReady.Store(&cause)
	if code, body := httpGet(t, srv, "/readyz"); code != http.StatusServiceUnavailable || body != "not ready: postgres link down, unavailable\n" {
		t.Errorf("/readyz while not ready: %d %q, want 503 naming the link and hiding the errors' text", code, body)
	}
	if code, body := httpGet(t, srv, "/healthz"); code != http.StatusOK {
		t.Errorf("/healthz while not ready: %d %q, want 200: liveness must not follow readiness", code, body)
	}
	if code, body := httpGet(t, srv, "/metrics"); code != http.StatusOK || !strings.Contains(body, `outbox_relay_build_info{commit="",go_version="`) {
		t.Errorf("/metrics: %d, build info missing from:\n%s", code, body)
	}

	if _, err := metrics.NewServer(srv.Addr(), reg, func() error { return nil }); err == nil {
		t.Errorf("NewServer on the taken address %s succeeded; want an error at once", srv.Addr())
	}
}

// serve runs a metrics server for g on a loopback port until the test ends,
// then checks that it shut down cleanly.
func serve(t *testing.T, g prometheus.Gatherer, ready func() error) *metrics.Server {
	t.Helper()
	srv, err := metrics.NewServer("127.0.0.1:0", g, ready)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve() }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		if err := <-served; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	return srv
}

// httpGet fetches path from srv and returns the status code and body.
func httpGet(t *testing.T, srv *metrics.Server, path string) (int, string) {
	t.Helper()
	resp, err := http.Get("http://" + srv.Addr() + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

// publicError is an error with a reason fit for /readyz, like relay.NotReady.
type publicError struct{ reason, detail string }

func (e publicError) Error() string  { return e.detail }
func (e publicError) Public() string { return e.reason }

// TestHealthzLiveness: /healthz answers 503 naming the cause while the
// liveness function reports an error, and 200 again once it does not.
func TestHealthzLiveness(t *testing.T) {
	t.Parallel()
	srv := serve(t, prometheus.NewRegistry(), func() error { return nil })
	var stuck atomic.Pointer[error]
	srv.SetLiveness(func() error {
		if e := stuck.Load(); e != nil {
			return *e
		}
		return nil
	})
	if code, body := httpGet(t, srv, "/healthz"); code != http.StatusOK {
		t.Fatalf("/healthz while live: %d %q", code, body)
	}
	cause := errors.New("claim loop stuck")
	stuck.Store(&cause)
	if code, body := httpGet(t, srv, "/healthz"); code != http.StatusServiceUnavailable || !strings.Contains(body, cause.Error()) {
		t.Fatalf("/healthz while stuck: %d %q, want 503 naming the cause", code, body)
	}
	stuck.Store(nil)
	if code, body := httpGet(t, srv, "/healthz"); code != http.StatusOK {
		t.Fatalf("/healthz after recovery: %d %q", code, body)
	}
}
