package obstest_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/outbox-relay/outbox-relay/internal/obstest"
)

// tableWide are the gauges one replica per table exports (the holder of
// the stats lease, relay/stats.go); another replica takes over when the
// holder goes.
var tableWide = []string{
	"outbox_relay_pending_events",
	"outbox_relay_delayed_events",
	"outbox_relay_dead_events",
	"outbox_relay_oldest_pending_age_seconds",
	"outbox_relay_table_stats_timestamp_seconds",
}

// TestDashboardFollowsTheTableAcrossAHandoff has promtool evaluate every
// dashboard query of a table-wide gauge while the stats lease passes from
// relay-0 (gone at 4m) to relay-1: before and after, each query must return
// one series per table, labelled by the table alone, with the holder's
// value. A query by instance would return a different series on each side
// of the handoff, and a panel would jump from one line to another.
func TestDashboardFollowsTheTableAcrossAHandoff(t *testing.T) {
	t.Parallel()
	queries, err := obstest.DashboardQueries(dashboardPath)
	if err != nil {
		t.Fatal(err)
	}
	// Every gauge reads 5 from its holder; the stats timestamp is always
	// 5 s old, so `time() - timestamp` reads 5 too.
	const job, table = "outbox-relay", "public.outbox"
	type series struct {
		Series string `yaml:"series"`
		Values string `yaml:"values"`
	}
	var input []series
	for _, holder := range []struct{ instance, gauge, stamp, info string }{
		{"relay-0:9464", "5x3 stale", "-5+60x3 stale", "1x3 stale"},
		{"relay-1:9464", "_x4 5x4", "_x4 235+60x4", "1x8"},
	} {
		labels := fmt.Sprintf(`job=%q, instance=%q`, job, holder.instance)
		input = append(input, series{fmt.Sprintf(`outbox_relay_info{%s, table=%q, exchange="x"}`, labels, table), holder.info})
		for _, m := range tableWide {
			v := holder.gauge
			if m == "outbox_relay_table_stats_timestamp_seconds" {
				v = holder.stamp
			}
			input = append(input, series{fmt.Sprintf("%s{%s}", m, labels), v})
		}
	}
	type sample struct {
		Labels string  `yaml:"labels"`
		Value  float64 `yaml:"value"`
	}
	type exprTest struct {
		Expr       string   `yaml:"expr"`
		EvalTime   string   `yaml:"eval_time"`
		ExpSamples []sample `yaml:"exp_samples"`
	}
	var tests []exprTest
	shown := map[string]bool{}
	for _, q := range queries {
		for _, m := range tableWide {
			if !strings.Contains(q.Expr, m) {
				continue
			}
			shown[m] = true
			expr := expandGrafanaVars(t, q.Expr)
			for _, at := range []string{"2m", "6m"} { // relay-0 holds, then relay-1
				tests = append(tests, exprTest{expr, at, []sample{{fmt.Sprintf("{table=%q}", table), 5}}})
			}
			break
		}
	}
	for _, m := range tableWide {
		if !shown[m] {
			t.Errorf("no dashboard query reads %s", m)
		}
	}
	file := map[string]any{
		"evaluation_interval": "1m",
		"tests": []map[string]any{{
			"interval":         "1m",
			"input_series":     input,
			"promql_expr_test": tests,
		}},
	}
	b, err := yaml.Marshal(file)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "handoff_test.yml"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := runTool(t, dir, nil, "promtool", "test", "rules", "handoff_test.yml")
	if err != nil || !strings.Contains(out, "SUCCESS") || strings.Contains(out, "FAILED") {
		t.Errorf("promtool test rules over the dashboard's table-wide queries, %d checks: %v\n%s", len(tests), err, out)
	}
}
