package testenv

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/outbox-relay/outbox-relay/metrics"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/relay/rabbitmq"
)

// RelayConfig is the usual test configuration of a relay for o and b: the
// exchange is the test's own, already declared, and shutdown is quick.
func RelayConfig(o *Outbox, b *Broker) relay.Config {
	declare := false
	return relay.Config{
		Postgres: relay.PostgresConfig{DSN: o.DSN, Schema: o.Schema, Table: o.Table.Name},
		AMQP:     relay.AMQPConfig{URL: b.URL, Exchange: b.Exchange, DeclareExchange: &declare},
		Relay:    relay.EngineConfig{ShutdownTimeout: 5 * time.Second},
	}
}

// Relay is a relay built for one test, with the collaborators it was
// given, so that a test can look at them.
type Relay struct {
	*relay.Relay
	Metrics   *metrics.Metrics
	Registry  *prometheus.Registry
	Pool      *pgxpool.Pool
	Publisher relay.Publisher
	stop      func() error
}

// Stop cancels a relay started by StartRelay and returns Run's error (see
// RunRelay); it may be called more than once. On a relay that was never
// started it returns nil.
func (r *Relay) Stop() error {
	if r.stop == nil {
		return nil
	}
	return r.stop()
}

// RelayOption changes what NewRelay and StartRelay give the relay.
type RelayOption func(*relayOptions)

type relayOptions struct {
	log  *zap.Logger
	reg  *prometheus.Registry
	mcfg metrics.Config
	pub  relay.Publisher
}

// WithLogger gives the relay log instead of the test's logger.
func WithLogger(log *zap.Logger) RelayOption { return func(o *relayOptions) { o.log = log } }

// WithRegistry puts the relay's metrics on reg instead of a registry of
// their own.
func WithRegistry(reg *prometheus.Registry) RelayOption {
	return func(o *relayOptions) { o.reg = reg }
}

// WithMetricsConfig creates the relay's metrics with c.
func WithMetricsConfig(c metrics.Config) RelayOption {
	return func(o *relayOptions) { o.mcfg = c }
}

// WithPublisher gives the relay pub instead of a rabbitmq publisher built
// from the configuration.
func WithPublisher(pub relay.Publisher) RelayOption {
	return func(o *relayOptions) { o.pub = pub }
}

// NewRelay builds a relay for cfg as cmd/outbox-relay does: its own pool
// (closed when the test ends), a rabbitmq publisher with the node gauge,
// metrics on a registry of their own, the test's logger. It does not run it.
func NewRelay(t testing.TB, cfg relay.Config, opts ...RelayOption) *Relay {
	t.Helper()
	o := relayOptions{}
	for _, opt := range opts {
		opt(&o)
	}
	if o.log == nil {
		o.log = zaptest.NewLogger(t)
	}
	if o.reg == nil {
		o.reg = prometheus.NewRegistry()
	}
	m, err := metrics.New(o.reg, o.mcfg)
	if err != nil {
		t.Fatal(err)
	}
	cfg = cfg.WithDefaults().WithAppNames()
	pool := NewPool(t, cfg)
	if o.pub == nil {
		o.pub = NewPublisher(t, cfg, o.log, m)
	}
	r, err := relay.New(cfg, relay.Deps{Logger: o.log, Metrics: m, Pool: pool, Publisher: o.pub})
	if err != nil {
		t.Fatal(err)
	}
	return &Relay{Relay: r, Metrics: m, Registry: o.reg, Pool: pool, Publisher: o.pub}
}

// StartRelay is NewRelay, then Run in the background until the test ends
// or Stop; a Run error fails the test (see RunRelay).
func StartRelay(t testing.TB, cfg relay.Config, opts ...RelayOption) *Relay {
	t.Helper()
	r := NewRelay(t, cfg, opts...)
	r.Start(t)
	return r
}

// Start runs a relay built by NewRelay in the background until the test
// ends or Stop (see RunRelay).
func (r *Relay) Start(t testing.TB) {
	t.Helper()
	r.stop = RunRelay(t, r.Relay)
}

// NewPool opens a pool for cfg's postgres section (relay.PoolConfig), closed
// when the test ends.
func NewPool(t testing.TB, cfg relay.Config) *pgxpool.Pool {
	t.Helper()
	poolCfg, err := relay.PoolConfig(cfg.WithDefaults().Postgres)
	if err != nil {
		t.Fatal(err)
	}
	pool, err := pgxpool.NewWithConfig(context.Background(), poolCfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool
}

// NewPublisher builds the rabbitmq publisher a relay with cfg uses, closed
// when the test ends; with m, it sets m's outbox_relay_amqp_node gauge.
func NewPublisher(t testing.TB, cfg relay.Config, log *zap.Logger, m *metrics.Metrics) *rabbitmq.Publisher {
	t.Helper()
	pub, err := rabbitmq.NewForRelay(cfg, log.Named("relay").Named("amqp"), m)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pub.Close() })
	return pub
}

// RunRelay runs r in the background until the test ends. The returned stop
// cancels it and waits for Run to return (failing the test if that takes
// more than 30 s) and returns Run's error; it may be called early and more
// than once. At cleanup a Run error fails the test.
func RunRelay(t testing.TB, r *relay.Relay) (stop func() error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	var (
		once   sync.Once
		runErr error
	)
	stop = func() error {
		once.Do(func() {
			cancel()
			select {
			case runErr = <-done:
			case <-time.After(30 * time.Second):
				t.Error("relay did not stop within 30s")
			}
		})
		return runErr
	}
	t.Cleanup(func() {
		if err := stop(); err != nil {
			t.Errorf("relay Run: %v", err)
		}
	})
	return stop
}

// NewAMQPPublisher is a rabbitmq publisher for cfg (defaults applied) that
// a test drives itself, closed when the test ends: window messages per
// batch, up to five batches pending, as many as a relay pipelines.
func NewAMQPPublisher(t testing.TB, cfg relay.AMQPConfig, window int, log *zap.Logger) *rabbitmq.Publisher {
	t.Helper()
	pub, err := rabbitmq.New(cfg, rabbitmq.Options{Logger: log, Window: window, Batches: 5})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pub.Close() })
	return pub
}
