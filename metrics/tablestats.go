package metrics

import (
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
)

// tableStats collects the table-wide gauges only while this replica holds
// the table's stats lease. Every replica would report the same numbers, and
// an alert on them would fire once per replica; absent series are the
// exception to "created at zero" that keeps it once per table.
type tableStats struct {
	gauges []prometheus.Gauge
	held   atomic.Bool
}

func (t *tableStats) Describe(ch chan<- *prometheus.Desc) {
	for _, g := range t.gauges {
		g.Describe(ch)
	}
}

func (t *tableStats) Collect(ch chan<- prometheus.Metric) {
	if !t.held.Load() {
		return
	}
	for _, g := range t.gauges {
		g.Collect(ch)
	}
}

// SetTableStatsHeld says whether this replica exports the table-wide
// gauges (Pending, OldestPendingAge, DeadRows, Delayed, StatsTimestamp).
func (m *Metrics) SetTableStatsHeld(held bool) {
	m.table.held.Store(held)
	if held {
		m.StatsLeader.Set(1)
	} else {
		m.StatsLeader.Set(0)
	}
}
