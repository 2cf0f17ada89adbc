package relay_test

import (
	"context"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/metrics"
	"github.com/outbox-relay/outbox-relay/relay"
)

// observed is a running relay with the registry its metrics are on.
type observed struct {
	*running
	reg *prometheus.Registry
}

func startObservable(t *testing.T, cfg relay.Config) observed {
	t.Helper()
	r := testenv.StartRelay(t, cfg)
	return observed{r, r.Registry}
}

// scrape returns the values of o's unlabelled families, from one Gather.
func (o observed) scrape(t *testing.T) map[string]float64 {
	t.Helper()
	families, err := o.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, f := range families {
		if len(f.GetMetric()) > 0 {
			out[f.GetName()] = f.GetMetric()[0].GetGauge().GetValue()
		}
	}
	return out
}

// exported returns the value of the unlabelled family name on o's
// registry, and whether o exports it at all.
func (o observed) exported(t *testing.T, name string) (float64, bool) {
	t.Helper()
	v, ok := o.scrape(t)[name]
	return v, ok
}

// TestDelayedRowIsNotLate checks that a pending row delayed by an hour does
// not move the oldest-age gauge (it would fire the stale-backlog alert) and
// is counted as delayed instead.
func TestDelayedRowIsNotLate(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	if _, err := o.Pool.Exec(context.Background(), `INSERT INTO `+o.Table.Quoted()+
		` (event_type, payload, created_at, available_at) VALUES ('reminder.due', '{}', now() - interval '10 minutes', now() + interval '1 hour')`); err != nil {
		t.Fatal(err)
	}
	cfg := config(o, b)
	cfg.Relay.StatsInterval = 50 * time.Millisecond
	r := startObservable(t, cfg)
	testenv.Eventually(t, 10*time.Second, "table-wide gauges exported", func() bool {
		_, ok := r.exported(t, "outbox_relay_table_stats_timestamp_seconds")
		return ok
	})
	age, _ := r.exported(t, "outbox_relay_oldest_pending_age_seconds")
	delayed, _ := r.exported(t, "outbox_relay_delayed_events")
	pending, _ := r.exported(t, "outbox_relay_pending_events")
	if age != 0 || delayed != 1 || pending != 1 {
		t.Errorf("oldest age %v, delayed %v, pending %v; want 0, 1, 1", age, delayed, pending)
	}
}

// TestTableStatsOneReplica checks that of three relays on one table exactly
// one exports the table-wide gauges (so alerts fire once per table), and
// that another takes over when it stops.
func TestTableStatsOneReplica(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	cfg := config(o, b)
	cfg.Relay.StatsInterval = 50 * time.Millisecond
	relays := []observed{startObservable(t, cfg), startObservable(t, cfg), startObservable(t, cfg)}
	exporters := func(rs []observed) (n int, which int) {
		for i, r := range rs {
			m := r.scrape(t)
			_, pending := m["outbox_relay_pending_events"]
			_, ts := m["outbox_relay_table_stats_timestamp_seconds"]
			leader := m["outbox_relay_table_stats_leader"]
			if pending != ts || pending != (leader == 1) {
				t.Fatalf("relay %d: pending exported %v, timestamp exported %v, leader %v: they must agree", i, pending, ts, leader)
			}
			if pending {
				n, which = n+1, i
			}
		}
		return n, which
	}
	testenv.Eventually(t, 10*time.Second, "one relay exports the table-wide gauges", func() bool {
		n, _ := exporters(relays)
		return n == 1
	})
	// Several stats rounds later, still the same one and only one.
	_, leader := exporters(relays)
	first, _ := relays[leader].exported(t, "outbox_relay_table_stats_timestamp_seconds")
	testenv.Eventually(t, 10*time.Second, "several stats rounds pass", func() bool {
		if n, now := exporters(relays); n != 1 || now != leader {
			t.Fatalf("%d relays export the table-wide gauges (the last relay %d), want relay %d alone", n, now, leader)
		}
		ts, _ := relays[leader].exported(t, "outbox_relay_table_stats_timestamp_seconds")
		return ts > first+1
	})

	if err := relays[leader].Stop(); err != nil {
		t.Fatal(err)
	}
	rest := append(append([]observed{}, relays[:leader]...), relays[leader+1:]...)
	testenv.Eventually(t, 10*time.Second, "another relay takes the counts over", func() bool {
		n, _ := exporters(rest)
		return n == 1
	})
}

// TestReadyzNamesLinksOnly checks that /readyz says which links are down
// but not their errors, which name hosts and users (those go to the log).
func TestReadyzNamesLinksOnly(t *testing.T) {
	t.Parallel()
	declare := false
	cfg := relay.Config{
		Postgres: relay.PostgresConfig{DSN: "postgres://secret_user@127.0.0.1:1/db?connect_timeout=1", Schema: "s", Table: "t"},
		AMQP:     relay.AMQPConfig{URL: "amqp://secret_user:pw@127.0.0.1:1/", Exchange: "x", DeclareExchange: &declare},
		Relay:    relay.EngineConfig{ShutdownTimeout: time.Second},
	}
	r := startObservable(t, cfg)
	testenv.Eventually(t, 20*time.Second, "both links fail with their real errors", func() bool {
		err := r.Ready()
		return err != nil && strings.Count(err.Error(), "127.0.0.1:1") >= 2
	})
	srv, err := metrics.NewServer("127.0.0.1:0", r.reg, r.Ready)
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve() }()
	defer srv.Shutdown(context.Background())
	resp, err := http.Get("http://" + srv.Addr() + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusServiceUnavailable || string(body) != "not ready: amqp link down, postgres link down\n" {
		t.Errorf("/readyz: %d %q, want 503 naming both links", resp.StatusCode, body)
	}
	if strings.Contains(string(body), "secret_user") || strings.Contains(string(body), "127.0.0.1") {
		t.Errorf("/readyz shows the errors' text: %q", body)
	}
}
