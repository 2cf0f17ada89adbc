package obstest_test

import (
	"net/http"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/obstest"
	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/relay"
)

// TestScrapedMetrics runs a relay against the shared PostgreSQL and
// RabbitMQ, makes it publish, fail, retry and park an event dead so that
// every labelled family has series, then checks its /metrics page against
// the dashboard, the alert rules, docs/metrics.md and `promtool check metrics`.
func TestScrapedMetrics(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	b.Queue(t, "ok.#", nil) // "nowhere.*" events are unroutable
	declare := false
	r := startRelay(t, relay.Config{
		Postgres: relay.PostgresConfig{DSN: o.DSN, Schema: o.Schema, Table: o.Table.Name},
		AMQP:     relay.AMQPConfig{URL: b.URL, Exchange: b.Exchange, DeclareExchange: &declare},
		Relay: relay.EngineConfig{
			MaxAttempts:     2, // the unroutable event: one retry, then dead
			RetryMinBackoff: 10 * time.Millisecond,
			RetryMaxBackoff: 20 * time.Millisecond,
			StatsInterval:   100 * time.Millisecond,
			ShutdownTimeout: 5 * time.Second,
		},
	})
	writeEvents(t, o, "ok.created", "ok.created", "ok.updated", "nowhere.lost")

	text, fams := scrapeEverySeries(t, "http://"+r.Addr)
	if code, body := get(t, "http://"+r.Addr+"/healthz"); code != http.StatusOK {
		t.Errorf("/healthz: %d %q", code, body)
	}

	exported := map[string]bool{"up": true} // up: Prometheus adds it to every target
	for _, f := range fams {
		for s := range f.Samples {
			exported[s] = true
		}
	}
	t.Run("dashboard and alert rules name only exported metrics", func(t *testing.T) { checkQueriesExported(t, exported) })
	t.Run("dashboard shows every relay metric", func(t *testing.T) { checkDashboardShows(t, fams) })
	t.Run("exported metrics are documented", func(t *testing.T) { checkDocumented(t, fams) })
	t.Run("promtool check metrics", func(t *testing.T) {
		out, err := runTool(t, "", strings.NewReader(text), "promtool", "check", "metrics")
		if err != nil || strings.TrimSpace(out) != "" {
			t.Errorf("promtool check metrics: %v\n%s", err, out)
		}
	})
}

// scrapeEverySeries waits until the relay at base is ready and its /metrics
// page has series in every labelled family the test's events feed, and one
// dead row; it returns the page and its parsed families.
func scrapeEverySeries(t *testing.T, base string) (text string, fams map[string]*obstest.Family) {
	t.Helper()
	eventually(t, 30*time.Second, "relay ready, events published, retried and parked dead", func() string {
		if code, body := get(t, base+"/readyz"); code != http.StatusOK {
			return "/readyz: " + strings.TrimSpace(body)
		}
		_, text = get(t, base+"/metrics")
		var err error
		if fams, err = obstest.ParseExposition(text); err != nil {
			t.Fatalf("/metrics: %v", err)
		}
		for _, name := range []string{"outbox_relay_events_published_total", "outbox_relay_publish_failures_total",
			"outbox_relay_events_returned_total", "outbox_relay_retries_scheduled_total", "outbox_relay_events_dead_total"} {
			if f := fams[name]; f == nil || len(f.Samples) == 0 {
				return name + " has no series yet"
			}
		}
		if !strings.Contains(text, "\noutbox_relay_dead_events 1\n") {
			return "outbox_relay_dead_events is not 1 yet"
		}
		return ""
	})
	return text, fams
}

// checkQueriesExported checks that every query of the dashboard and the
// alert rules names only exported series.
func checkQueriesExported(t *testing.T, exported map[string]bool) {
	queries, err := obstest.DashboardQueries(dashboardPath)
	if err != nil {
		t.Fatal(err)
	}
	rules, err := obstest.ReadRules(alertsPath)
	if err != nil {
		t.Fatal(err)
	}
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			queries = append(queries, obstest.DashboardQuery{Where: "alert " + r.Alert + r.Record, Expr: r.Expr})
		}
	}
	if len(queries) < 20 {
		t.Fatalf("only %d queries found in the dashboard and rules", len(queries))
	}
	for _, q := range queries {
		names := obstest.ExprMetricNames(q.Expr)
		if len(names) == 0 {
			t.Errorf("%s: no metric name found in %q", q.Where, q.Expr)
		}
		for _, n := range names {
			if !exported[n] {
				t.Errorf("%s uses %s, which the relay does not export (query %q)", q.Where, n, q.Expr)
			}
		}
	}
}

// checkDashboardShows checks that a dashboard panel shows each relay family.
func checkDashboardShows(t *testing.T, fams map[string]*obstest.Family) {
	queries, err := obstest.DashboardQueries(dashboardPath)
	if err != nil {
		t.Fatal(err)
	}
	shown := map[string]bool{}
	for _, q := range queries {
		for _, n := range obstest.ExprMetricNames(q.Expr) {
			shown[n] = true
		}
	}
	for name, f := range fams {
		if !strings.HasPrefix(name, "outbox_relay_") {
			continue
		}
		if !slices.ContainsFunc(keys(f.Samples), func(s string) bool { return shown[s] }) {
			t.Errorf("%s (%s) is on no panel of deploy/grafana/outbox-relay-dashboard.json", name, f.Type)
		}
	}
}

// checkDocumented checks that docs/metrics.md documents exactly the relay's
// families, each with its type and labels.
func checkDocumented(t *testing.T, fams map[string]*obstest.Family) {
	doc, err := obstest.ParseMetricsDoc(metricsDoc)
	if err != nil {
		t.Fatal(err)
	}
	for name, f := range fams {
		if !strings.HasPrefix(name, "outbox_relay_") {
			continue
		}
		d, ok := doc[name]
		if !ok {
			t.Errorf("%s (%s) is exported but not documented in docs/metrics.md", name, f.Type)
			continue
		}
		if d.Type != f.Type {
			t.Errorf("%s: docs/metrics.md says %s, /metrics says %s", name, d.Type, f.Type)
		}
		if labels := keys(f.Labels); !slices.Equal(labels, d.Labels) {
			t.Errorf("%s: docs/metrics.md lists labels %v, /metrics has %v", name, d.Labels, labels)
		}
	}
	for name := range doc {
		if fams[name] == nil {
			t.Errorf("docs/metrics.md documents %s, which is not in the relay's /metrics output", name)
		}
	}
}

func keys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
