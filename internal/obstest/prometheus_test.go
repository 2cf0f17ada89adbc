package obstest_test

import (
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"net/url"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/outbox-relay/outbox-relay/internal/obstest"
	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/relay"
)

// grafanaVars are the values the dashboard's variables take when its
// queries are checked: any job and instance, Grafana's usual intervals.
var grafanaVars = map[string]string{
	"job": ".*", "instance": ".*",
	"__rate_interval": "1m", "__interval": "15s", "__range": "1h",
}

var grafanaVar = regexp.MustCompile(`\$\{(\w+)\}|\$(\w+)`)

func expandGrafanaVars(t *testing.T, q string) string {
	t.Helper()
	return grafanaVar.ReplaceAllStringFunc(q, func(v string) string {
		name := strings.Trim(v, "${}")
		val, ok := grafanaVars[name]
		if !ok {
			t.Errorf("query %q uses the unknown variable %s", q, v)
		}
		return val
	})
}

// TestDashboard checks the Grafana dashboard's structure (importable, data
// source a variable, panels laid out without overlap) and has a real
// Prometheus parse every one of its queries.
func TestDashboard(t *testing.T) {
	t.Parallel()
	b, err := os.ReadFile(dashboardPath)
	if err != nil {
		t.Fatal(err)
	}
	var d dashboard
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("%s: %v", dashboardPath, err)
	}
	if d.UID == "" || d.Title == "" || d.SchemaVersion < 36 {
		t.Errorf("dashboard uid %q, title %q, schemaVersion %d: want a uid, a title and schemaVersion ≥ 36", d.UID, d.Title, d.SchemaVersion)
	}
	if len(d.Inputs) != 1 || d.Inputs[0].Name != "DS_PROMETHEUS" || d.Inputs[0].PluginID != "prometheus" {
		t.Errorf("__inputs = %+v, want the one DS_PROMETHEUS prometheus data source (for Import)", d.Inputs)
	}
	hasDSVar := false
	for _, v := range d.Templating.List {
		if v.Name == "DS_PROMETHEUS" && v.Type == "datasource" && v.Query == "prometheus" {
			hasDSVar = true
		}
	}
	if !hasDSVar {
		t.Error("templating has no DS_PROMETHEUS data source variable (for provisioning from a file)")
	}
	checkPanels(t, d.Panels)

	// Prometheus is the only complete PromQL parser at hand: it answers
	// bad_data for a query that does not parse.
	queries, err := obstest.DashboardQueries(dashboardPath)
	if err != nil {
		t.Fatal(err)
	}
	p := startPrometheus(t, "global:\n  scrape_interval: 15s\n", map[string]string{})
	for _, q := range queries {
		expr := expandGrafanaVars(t, q.Expr)
		if r := p.api(t, "/api/v1/query", url.Values{"query": {expr}}); r.Status != "success" {
			t.Errorf("%s: Prometheus rejects %q: %s: %s", q.Where, expr, r.ErrorType, r.Error)
		}
	}
}

// dashboard is the part of the Grafana dashboard's JSON that TestDashboard
// checks.
type dashboard struct {
	UID           string  `json:"uid"`
	Title         string  `json:"title"`
	SchemaVersion int     `json:"schemaVersion"`
	Panels        []panel `json:"panels"`
	Inputs        []struct {
		Name, Type, PluginID string
	} `json:"__inputs"`
	Templating struct {
		List []struct {
			Name, Type string
			Query      any
		} `json:"list"`
	} `json:"templating"`
}

type panel struct {
	ID         int         `json:"id"`
	Type       string      `json:"type"`
	Title      string      `json:"title"`
	Datasource *datasource `json:"datasource"`
	GridPos    struct {
		H, W, X, Y int
	} `json:"gridPos"`
	Targets []struct {
		Datasource *datasource `json:"datasource"`
		Expr       string      `json:"expr"`
	} `json:"targets"`
}

type datasource struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

// checkPanels checks that panels have distinct ids, lie on the 24-column
// grid without overlapping, and query the DS_PROMETHEUS data source.
func checkPanels(t *testing.T, panels []panel) {
	t.Helper()
	ids := map[int]string{}
	var placed []panel
	for _, p := range panels {
		if prev, dup := ids[p.ID]; dup {
			t.Errorf("panels %q and %q share id %d", prev, p.Title, p.ID)
		}
		ids[p.ID] = p.Title
		g := p.GridPos
		if g.W <= 0 || g.H <= 0 || g.X < 0 || g.X+g.W > 24 || g.Y < 0 {
			t.Errorf("panel %q: gridPos %+v outside the 24-column grid", p.Title, g)
		}
		for _, q := range placed {
			o := q.GridPos
			if g.X < o.X+o.W && o.X < g.X+g.W && g.Y < o.Y+o.H && o.Y < g.Y+g.H {
				t.Errorf("panels %q %+v and %q %+v overlap", q.Title, o, p.Title, g)
			}
		}
		placed = append(placed, p)
		if p.Type == "row" {
			continue
		}
		if p.Datasource == nil || p.Datasource.UID != "${DS_PROMETHEUS}" {
			t.Errorf("panel %q: datasource %+v, want uid ${DS_PROMETHEUS}", p.Title, p.Datasource)
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			if tg.Datasource == nil || tg.Datasource.UID != "${DS_PROMETHEUS}" {
				t.Errorf("panel %q: a target's datasource is %+v, want uid ${DS_PROMETHEUS}", p.Title, tg.Datasource)
			}
		}
	}
}

// testRules returns alerts.yml with only the durations and thresholds of
// some alerts shortened, so a test sees them fire within seconds; the
// expressions are otherwise the shipped ones.
func testRules(t *testing.T) string {
	t.Helper()
	rules, err := obstest.ReadRules(alertsPath)
	if err != nil {
		t.Fatal(err)
	}
	changed := map[string]bool{}
	for gi := range rules.Groups {
		for ri := range rules.Groups[gi].Rules {
			r := &rules.Groups[gi].Rules[ri]
			switch r.Alert {
			case "OutboxRelayBacklogStale":
				// Shipped: oldest pending older than 60s for 2m.
				if strings.Count(r.Expr, "> 60") != 1 {
					t.Fatalf("OutboxRelayBacklogStale: expected one \"> 60\" threshold in %q", r.Expr)
				}
				r.Expr = strings.Replace(r.Expr, "> 60", "> 2", 1)
				r.For = "1s"
				changed[r.Alert] = true
			case "OutboxRelayBrokerLinkDown":
				r.For = "1s"
				changed[r.Alert] = true
			}
		}
	}
	if len(changed) != 2 {
		t.Fatalf("alerts.yml: found %v of OutboxRelayBacklogStale and OutboxRelayBrokerLinkDown", changed)
	}
	out, err := yaml.Marshal(rules)
	if err != nil {
		t.Fatal(err)
	}
	return string(out)
}

// TestPrometheusAlertsOnBrokerOutage has a real Prometheus scrape a relay
// every second: the published counter and the end-to-end latency histogram
// move as events flow; while a private RabbitMQ is stopped the backlog-age
// and broker-link alerts fire and /readyz fails; once it is back they resolve.
func TestPrometheusAlertsOnBrokerOutage(t *testing.T) {
	t.Parallel()
	begin := time.Now()
	needTool(t, "prometheus")
	rmq := testenv.StartRabbitMQ(t) // stopped below: never the shared broker
	o, b := testenv.NewOutbox(t), testenv.NewBrokerAt(t, rmq.URL())
	b.DurableQueue(t, "#", nil)
	declare := false
	r := startRelay(t, relay.Config{
		Postgres: relay.PostgresConfig{DSN: o.DSN, Schema: o.Schema, Table: o.Table.Name},
		AMQP:     relay.AMQPConfig{URL: b.URL, Exchange: b.Exchange, DeclareExchange: &declare},
		Relay:    relay.EngineConfig{StatsInterval: 200 * time.Millisecond, ShutdownTimeout: 5 * time.Second},
	})
	p := startPrometheus(t, fmt.Sprintf(`global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files: [alerts.yml]
scrape_configs:
  - job_name: outbox-relay
    static_configs:
      - targets: [%q]
`, r.Addr), map[string]string{"alerts.yml": testRules(t)})
	t.Logf("RabbitMQ, relay and Prometheus up after %v", time.Since(begin).Round(time.Millisecond))

	awaitFirstScrape(t, p)
	// Events flow: the counter and the histogram move.
	const first, second = 25, 5
	writeEvents(t, o, repeat("lesson.published", first)...)
	awaitFlow(t, p, first)

	// Broker outage: events wait, their age passes the threshold.
	outage := time.Now()
	rmq.Stop(t)
	t.Logf("RabbitMQ stopped in %v", time.Since(outage).Round(time.Millisecond))
	writeEvents(t, o, repeat("lesson.published", second)...)
	awaitOutageAlerts(t, p, r.Addr, outage)

	// The broker is back: the backlog drains and the alerts resolve.
	restart := time.Now()
	rmq.Start(t)
	back := time.Now()
	t.Logf("RabbitMQ started again in %v", back.Sub(restart).Round(time.Millisecond))
	awaitRecovery(t, p, r.Addr, back, first+second)
}

// relayJob selects the relay's series in the test's Prometheus.
const relayJob = `{job="outbox-relay"}`

// awaitFirstScrape waits for Prometheus to scrape the relay, and checks that
// nothing was relayed before any event was written.
func awaitFirstScrape(t *testing.T, p *prometheusServer) {
	t.Helper()
	eventually(t, 30*time.Second, "Prometheus scrapes the relay, no event relayed yet", func() string {
		if v, ok := p.scalar(t, "up"+relayJob); !ok || v != 1 {
			return fmt.Sprintf("up = %v (present %v)", v, ok)
		}
		n, ok := p.scalar(t, "outbox_relay_end_to_end_latency_seconds_count"+relayJob)
		if !ok {
			return "no end-to-end latency histogram yet"
		}
		if n != 0 {
			t.Fatalf("end-to-end latency count %v before any event was written", n)
		}
		return ""
	})
	if v, ok := p.scalar(t, "sum(outbox_relay_events_published_total"+relayJob+")"); ok && v != 0 {
		t.Fatalf("published %v events before any was written", v)
	}
}

// awaitFlow waits for the published counter and the latency histogram to
// count n events, with no backlog alert meanwhile.
func awaitFlow(t *testing.T, p *prometheusServer, n int) {
	t.Helper()
	flow := time.Now()
	eventually(t, 30*time.Second, "published counter and latency histogram move in Prometheus", func() string {
		pub, _ := p.scalar(t, "sum(outbox_relay_events_published_total"+relayJob+")")
		count, _ := p.scalar(t, "outbox_relay_end_to_end_latency_seconds_count"+relayJob)
		p99, ok := p.scalar(t, "histogram_quantile(0.99, sum by (le) (rate(outbox_relay_end_to_end_latency_seconds_bucket"+relayJob+"[1m])))")
		if pub < float64(n) || count < float64(n) || !ok || math.IsNaN(p99) || p99 <= 0 {
			return fmt.Sprintf("published %v, latency count %v, p99 %v; want %d, %d and a positive p99", pub, count, p99, n, n)
		}
		return ""
	})
	t.Logf("events seen by Prometheus %v after writing them", time.Since(flow).Round(time.Millisecond))
	if a := p.alerts(t, "OutboxRelayBacklogStale"); len(a) != 0 {
		t.Fatalf("backlog alert active while events flow: %+v", a)
	}
}

// awaitOutageAlerts waits, with the broker stopped since outage, for the
// backlog-age and broker-link alerts to fire; the relay at addr is then not
// ready but live.
func awaitOutageAlerts(t *testing.T, p *prometheusServer, addr string, outage time.Time) {
	t.Helper()
	eventually(t, 60*time.Second, "backlog-age and broker-link alerts fire while RabbitMQ is stopped", func() string {
		var missing []string
		for _, name := range []string{"OutboxRelayBacklogStale", "OutboxRelayBrokerLinkDown"} {
			if !firing(p.alerts(t, name)) {
				missing = append(missing, name+" not firing")
			}
		}
		return strings.Join(missing, ", ")
	})
	t.Logf("alerts firing %v after the broker stopped", time.Since(outage).Round(time.Millisecond))
	if code, body := get(t, "http://"+addr+"/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "amqp") {
		t.Errorf("/readyz during the outage: %d %q, want 503 naming amqp", code, body)
	}
	if code, _ := get(t, "http://"+addr+"/healthz"); code != http.StatusOK {
		t.Errorf("/healthz during the outage: %d, want 200", code)
	}
}

// awaitRecovery waits, with the broker back since back, for the alerts to
// resolve and total events to be published; the relay at addr reconnected
// and is ready again, and was never reported down.
func awaitRecovery(t *testing.T, p *prometheusServer, addr string, back time.Time, total int) {
	t.Helper()
	eventually(t, 60*time.Second, "backlog drained and the alerts resolved after RabbitMQ is back", func() string {
		var why []string
		for _, name := range []string{"OutboxRelayBacklogStale", "OutboxRelayBrokerLinkDown"} {
			if firing(p.alerts(t, name)) {
				why = append(why, name+" still firing")
			}
		}
		if pub, _ := p.scalar(t, "sum(outbox_relay_events_published_total"+relayJob+")"); pub < float64(total) {
			why = append(why, fmt.Sprintf("published %v of %d", pub, total))
		}
		return strings.Join(why, ", ")
	})
	t.Logf("alerts resolved %v after the broker started", time.Since(back).Round(time.Millisecond))
	if v, _ := p.scalar(t, `outbox_relay_reconnects_total{job="outbox-relay", link="amqp"}`); v < 1 {
		t.Errorf("outbox_relay_reconnects_total{link=\"amqp\"} = %v after the broker came back, want ≥ 1", v)
	}
	eventually(t, 10*time.Second, "/readyz ready again", func() string {
		if code, body := get(t, "http://"+addr+"/readyz"); code != http.StatusOK {
			return strings.TrimSpace(body)
		}
		return ""
	})
	if a := p.alerts(t, "OutboxRelayDown"); firing(a) {
		t.Errorf("OutboxRelayDown fired although the relay was scraped all along: %+v", a)
	}
}

func firing(alerts []alert) bool {
	for _, a := range alerts {
		if a.State == "firing" {
			return true
		}
	}
	return false
}
