package metrics

import (
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
)

// tableStats collects the table-wide gauges only while this replica holds
// the table's stats lease. Every replica would report the same numbers, and
// an alert on them would fire once per replica; absent series are the
// exception to "created at zero" that keeps it once per table.
//
// outbox_relay_table_stats_leader is collected here too, from the same read
// of held, so that a scrape never shows it disagreeing with the gauges.
type tableStats struct {
	gauges []prometheus.Gauge
	leader *prometheus.Desc
	held   atomic.Bool
}

func newTableStats(gauges ...prometheus.Gauge) *tableStats {
	return &tableStats{gauges: gauges, leader: prometheus.NewDesc("outbox_relay_table_stats_leader",
		"1 while this replica holds the table's stats lease and exports the table-wide gauges, else 0.", nil, nil)}
}

func (t *tableStats) Describe(ch chan<- *prometheus.Desc) {
	ch <- t.leader
	for _, g := range t.gauges {
		g.Describe(ch)
	}
}

func (t *tableStats) Collect(ch chan<- prometheus.Metric) {
	held := t.held.Load()
	leader := 0.0
	if held {
		leader = 1
	}
	ch <- prometheus.MustNewConstMetric(t.leader, prometheus.GaugeValue, leader)
	if !held {
		return
	}
	for _, g := range t.gauges {
		g.Collect(ch)
	}
}

// SetTableStatsHeld says whether this replica exports the table-wide
// gauges (Pending, OldestPendingAge, DeadRows, Delayed, StatsTimestamp).
func (m *Metrics) SetTableStatsHeld(held bool) { m.table.held.Store(held) }
