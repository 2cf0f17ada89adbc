package ops_test

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap/zaptest"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/metrics"
	"github.com/outbox-relay/outbox-relay/relay"
)

// config returns a relay config for the test's outbox and broker.
func config(o *testenv.Outbox, b *testenv.Broker) relay.Config {
	declare := false
	return relay.Config{
		Postgres: relay.PostgresConfig{DSN: o.DSN, Schema: o.Schema, Table: o.Table.Name},
		AMQP:     relay.AMQPConfig{URL: b.URL, Exchange: b.Exchange, DeclareExchange: &declare},
		Relay:    relay.EngineConfig{ShutdownTimeout: 5 * time.Second},
	}
}

// start runs a relay until the test ends, to dispatch what a replay then
// publishes again.
func start(t *testing.T, cfg relay.Config) {
	t.Helper()
	m, err := metrics.New(prometheus.NewRegistry(), metrics.Config{})
	if err != nil {
		t.Fatal(err)
	}
	r, err := relay.New(cfg, relay.Deps{Logger: zaptest.NewLogger(t), Metrics: m})
	if err != nil {
		t.Fatal(err)
	}
	testenv.RunRelay(t, r)
}
