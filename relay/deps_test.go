package relay_test

import (
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap/zaptest"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/metrics"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/relay/relaytest"
)

// TestNewRequiresDeps: the engine builds none of its collaborators; New
// refuses a missing one, naming it, instead of failing later in Run.
func TestNewRequiresDeps(t *testing.T) {
	t.Parallel()
	o := testenv.NewOutbox(t)
	cfg := relay.Config{
		Postgres: relay.PostgresConfig{DSN: o.DSN, Schema: o.Schema, Table: o.Table.Name},
		AMQP:     relay.AMQPConfig{URL: "amqp://relaytest.invalid/", Exchange: "relaytest"},
	}
	m, err := metrics.New(prometheus.NewRegistry(), metrics.Config{})
	if err != nil {
		t.Fatal(err)
	}
	full := relay.Deps{Logger: zaptest.NewLogger(t), Metrics: m, Pool: testenv.NewPool(t, cfg), Publisher: relaytest.NewFake()}
	for _, c := range []struct {
		missing string
		drop    func(*relay.Deps)
	}{
		{"Logger", func(d *relay.Deps) { d.Logger = nil }},
		{"Metrics", func(d *relay.Deps) { d.Metrics = nil }},
		{"Pool", func(d *relay.Deps) { d.Pool = nil }},
		{"Publisher", func(d *relay.Deps) { d.Publisher = nil }},
	} {
		deps := full
		c.drop(&deps)
		if _, err := relay.New(cfg, deps); err == nil || !strings.Contains(err.Error(), c.missing) {
			t.Errorf("New without %s: error %v, want one naming %s", c.missing, err, c.missing)
		}
	}
	if _, err := relay.New(cfg, full); err != nil {
		t.Fatalf("New with every dependency: %v", err)
	}
	// A pool smaller than postgres.max_conns would starve the batches in
	// flight: New names the key and the fix.
	wide := cfg
	wide.Postgres.MaxConns = full.Pool.Config().MaxConns + 2
	if _, err := relay.New(wide, full); err == nil || !strings.Contains(err.Error(), "postgres.max_conns") || !strings.Contains(err.Error(), "relay.PoolConfig") {
		t.Errorf("New with a pool smaller than postgres.max_conns: error %v, want one naming postgres.max_conns and relay.PoolConfig", err)
	}
}
