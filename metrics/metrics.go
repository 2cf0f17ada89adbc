// Package metrics defines the relay's Prometheus collectors, registered on a
// registry the caller passes in (never the global one), and serves them with
// the health endpoints.
package metrics

import (
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
)

// Label values of the fixed sets used below.
const (
	LinkPostgres = "postgres"
	LinkListen   = "listen"
	LinkAMQP     = "amqp"

	WakeNotify    = "notify"
	WakePoll      = "poll"
	WakeReconnect = "reconnect"

	StageClaim   = "claim"
	StagePublish = "publish"
	StageMark    = "mark"

	CleanDispatched = "dispatched"
	CleanDead       = "dead"

	OtherEventType = "other"
)

// Links, WakeSources and Stages are the label values created at zero up front.
var (
	Links       = []string{LinkPostgres, LinkListen, LinkAMQP}
	WakeSources = []string{WakeNotify, WakePoll, WakeReconnect}
	Stages      = []string{StageClaim, StagePublish, StageMark}
)

// Metrics is the relay's set of collectors.
type Metrics struct {
	Published        *prometheus.CounterVec   // event_type
	Failed           *prometheus.CounterVec   // event_type, reason
	Returned         *prometheus.CounterVec   // event_type: unroutable returns, failed or accepted
	Dead             *prometheus.CounterVec   // event_type, reason: rows parked dead
	BatchDuration    prometheus.Histogram     // claim to commit
	StageDuration    *prometheus.HistogramVec // stage: claim, publish, mark
	Retries          *prometheus.CounterVec   // event_type: rows scheduled for another attempt
	Cleaned          *prometheus.CounterVec   // kind: dispatched, dead rows deleted by retention
	PartitionsOwned  prometheus.Gauge         // ordered mode: partitions leased by this replica
	Partitions       prometheus.Gauge         // ordered mode: relay.partitions
	HorizonWait      prometheus.Gauge         // ordered mode: seconds the commit horizon waits for old transactions
	BatchSize        prometheus.Histogram     // rows claimed per non-empty batch
	PublishLatency   prometheus.Histogram     // publish to confirm, per batch
	EndToEndLatency  prometheus.Histogram     // created_at to confirm, per event
	Pending          prometheus.Gauge         // pending rows (table-wide, see SetTableStatsHeld)
	OldestPendingAge prometheus.Gauge         // seconds, oldest due row (table-wide)
	DeadRows         prometheus.Gauge         // rows parked dead (table-wide)
	Delayed          prometheus.Gauge         // pending rows not yet due (table-wide)
	StatsTimestamp   prometheus.Gauge         // unix time the table-wide counts were taken
	Info             *prometheus.GaugeVec     // table, exchange
	LinkUp           *prometheus.GaugeVec     // link
	Reconnects       *prometheus.CounterVec   // link
	Wakeups          *prometheus.CounterVec   // source
	BuildInfo        *prometheus.GaugeVec     // version, commit, go_version
	Ready            prometheus.GaugeFunc     // 1 while the readiness func (SetReadiness) returns nil
	AMQPNode         *prometheus.GaugeVec     // node: 1 for the amqp.url node connected to

	readiness atomic.Pointer[func() error]
	table     *tableStats
	maxTypes  int
	mu        sync.Mutex
	types     map[string]struct{}
}

// Config bounds label cardinality and names the build.
type Config struct {
	// MaxEventTypes is the most distinct event_type label values; later types
	// are counted as "other". Default 100.
	MaxEventTypes int
	// Version and Commit label outbox_relay_build_info.
	Version, Commit string
}

// New creates the collectors and registers them on reg.
func New(reg prometheus.Registerer, cfg Config) (*Metrics, error) {
	if cfg.MaxEventTypes <= 0 {
		cfg.MaxEventTypes = 100
	}
	latency := []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300}
	m := &Metrics{
		Published: counterVec("outbox_relay_events_published_total",
			"Events confirmed by the broker, by event type.", "event_type"),
		Failed: counterVec("outbox_relay_publish_failures_total",
			"Failed publish attempts by event type and reason (nack, unroutable, timeout, connection, too_large, invalid).", "event_type", "reason"),
		Returned: counterVec("outbox_relay_events_returned_total",
			"Messages the broker returned as unroutable, whether treated as failures or accepted (amqp.unroutable).", "event_type"),
		Dead: counterVec("outbox_relay_events_dead_total",
			"Events parked dead by this relay, by event type and the reason of the last failure.", "event_type", "reason"),
		BatchDuration: histogram("outbox_relay_batch_duration_seconds",
			"Time from claiming a batch to committing its outcome.", latency),
		StageDuration: histogramVec("outbox_relay_stage_duration_seconds",
			"Time spent per batch in each stage: claim (select and lock), publish (until the last confirm), mark (record outcome and commit).", latency, "stage"),
		Retries: counterVec("outbox_relay_retries_scheduled_total",
			"Failed events scheduled for another attempt with backoff, by event type.", "event_type"),
		Cleaned: counterVec("outbox_relay_rows_cleaned_total",
			"Rows deleted by the retention cleaner, by kind (dispatched, dead).", "kind"),
		PartitionsOwned: gauge("outbox_relay_partitions_owned",
			"Virtual partitions leased by this replica (relay.ordering: partition_key; 0 otherwise)."),
		Partitions: gauge("outbox_relay_partitions",
			"Ordered mode: relay.partitions, the virtual partitions the replicas split between them (0 otherwise)."),
		HorizonWait: gauge("outbox_relay_commit_horizon_wait_seconds",
			"Ordered mode: how long committed keyed rows have been held back waiting for older, still open transactions to end."),
		BatchSize: histogram("outbox_relay_batch_size",
			"Rows claimed per non-empty batch.", []float64{1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000}),
		PublishLatency: histogram("outbox_relay_publish_confirm_seconds",
			"Time from the first publish of a batch to its last confirm.", latency),
		EndToEndLatency: histogram("outbox_relay_end_to_end_latency_seconds",
			"Time from an event's created_at (its transaction's start) to the broker's confirm.", latency),
		Pending: gauge("outbox_relay_pending_events",
			"Rows neither dispatched nor dead, read from the table every relay.stats_interval."),
		OldestPendingAge: gauge("outbox_relay_oldest_pending_age_seconds",
			"Age (since created_at) of the oldest pending row that is due, available_at reached (0 when none), read every relay.stats_interval."),
		Delayed: gauge("outbox_relay_delayed_events",
			"Pending rows not yet due (available_at in the future: delayed on purpose or waiting for a retry), read every relay.stats_interval."),
		StatsTimestamp: gauge("outbox_relay_table_stats_timestamp_seconds",
			"Unix time the table-wide gauges (pending, delayed, dead, oldest age) were last read; they are exported by one replica per table."),
		Info: gaugeVec("outbox_relay_info",
			"Always 1; labels name the outbox table (schema.table) and the exchange this relay serves.", "table", "exchange"),
		DeadRows: gauge("outbox_relay_dead_events",
			"Rows parked dead in the table, read every relay.stats_interval."),
		LinkUp: gaugeVec("outbox_relay_link_up",
			"1 while the link (postgres, listen, amqp) is up, else 0.", "link"),
		Reconnects: counterVec("outbox_relay_reconnects_total",
			"Times a link was re-established after being down.", "link"),
		Wakeups: counterVec("outbox_relay_wakeups_total",
			"Claim loop wake-ups by source (notify, poll, reconnect).", "source"),
		BuildInfo: gaugeVec("outbox_relay_build_info",
			"Always 1; labels carry the version, commit and Go version.", "version", "commit", "go_version"),
		AMQPNode: gaugeVec("outbox_relay_amqp_node",
			"1 for the broker node (host:port of an amqp.url entry) the relay is connected to, 0 for the other configured ones.", "node"),
		maxTypes: cfg.MaxEventTypes,
		types:    make(map[string]struct{}),
	}
	m.Ready = prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "outbox_relay_ready",
		Help: "1 while the relay is ready as /readyz reports it (its links up, the claim loop not stuck), else 0."}, func() float64 {
		if f := m.readiness.Load(); f != nil && (*f)() == nil {
			return 1
		}
		return 0
	})
	m.table = newTableStats(m.Pending, m.OldestPendingAge, m.DeadRows, m.Delayed, m.StatsTimestamp)
	for _, c := range []prometheus.Collector{m.Published, m.Failed, m.Returned, m.Dead, m.BatchDuration,
		m.StageDuration, m.Retries, m.Cleaned, m.PartitionsOwned, m.HorizonWait, m.BatchSize, m.PublishLatency, m.EndToEndLatency, m.table,
		m.LinkUp, m.Reconnects, m.Wakeups, m.BuildInfo, m.Ready, m.AMQPNode, m.Info, m.Partitions} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	for _, l := range Links {
		m.Reconnects.WithLabelValues(l)
	}
	for _, k := range []string{CleanDispatched, CleanDead} {
		m.Cleaned.WithLabelValues(k)
	}
	for _, s := range Stages {
		m.StageDuration.WithLabelValues(s)
	}
	for _, s := range WakeSources {
		m.Wakeups.WithLabelValues(s)
	}
	m.BuildInfo.WithLabelValues(cfg.Version, cfg.Commit, runtime.Version()).Set(1)
	return m, nil
}

// SetReadiness sets the function behind outbox_relay_ready (relay.New
// passes the relay's Ready); until then the gauge reads 0.
func (m *Metrics) SetReadiness(ready func() error) { m.readiness.Store(&ready) }

// EventType returns the label value for an event type: the type itself for
// the first MaxEventTypes distinct types seen, "other" after that.
func (m *Metrics) EventType(t string) string {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.types[t]; ok {
		return t
	}
	if len(m.types) >= m.maxTypes {
		return OtherEventType
	}
	m.types[t] = struct{}{}
	return t
}

// The collectors' constructors: a name, its help text, a histogram's
// buckets, and a vector's label names.

func gauge(name, help string) prometheus.Gauge {
	return prometheus.NewGauge(prometheus.GaugeOpts{Name: name, Help: help})
}

func gaugeVec(name, help string, labels ...string) *prometheus.GaugeVec {
	return prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: name, Help: help}, labels)
}

func counterVec(name, help string, labels ...string) *prometheus.CounterVec {
	return prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, labels)
}

func histogram(name, help string, buckets []float64) prometheus.Histogram {
	return prometheus.NewHistogram(prometheus.HistogramOpts{Name: name, Help: help, Buckets: buckets})
}

func histogramVec(name, help string, buckets []float64, labels ...string) *prometheus.HistogramVec {
	return prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: name, Help: help, Buckets: buckets}, labels)
}
