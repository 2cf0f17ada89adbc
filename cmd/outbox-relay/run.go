package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"go.uber.org/zap"

	"github.com/outbox-relay/outbox-relay/metrics"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/relay/rabbitmq"
	"github.com/outbox-relay/outbox-relay/schema"
)

func (c *cliEnv) cmdRun(ctx context.Context) error {
	cfg, err := c.loadConfig()
	if err != nil {
		return err
	}
	log := newLogger(cfg.Log, c.stderr)
	defer func() { _ = log.Sync() }()
	if links := cfg.ServiceLinks(); len(links) > 0 {
		log.Info("ignoring Kubernetes service-link variables of a Service named after the relay (enableServiceLinks: false on the pod drops them)",
			zap.Strings("variables", links))
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m, err := metrics.New(reg, metrics.Config{MaxEventTypes: cfg.Metrics.MaxEventTypes, Version: version, Commit: buildCommit()})
	if err != nil {
		return err
	}
	if cfg.Migrate.Auto {
		if err := migrateUp(ctx, cfg.Postgres, log); err != nil {
			return err
		}
	}
	// The relay takes its pool and publisher from here, built from the same
	// configuration; the pool is closed after Run, the publisher by Run.
	poolCfg, err := relay.PoolConfig(cfg.Postgres)
	if err != nil {
		return &configError{err}
	}
	pool, err := pgxpool.NewWithConfig(context.WithoutCancel(ctx), poolCfg)
	if err != nil {
		return fmt.Errorf("postgres pool: %w", err)
	}
	defer pool.Close()
	pub, err := rabbitmq.NewForRelay(cfg.Config, log.Named("relay").Named("amqp"), m)
	if err != nil {
		return &configError{err}
	}
	r, err := relay.New(cfg.Config, relay.Deps{Logger: log, Metrics: m, Pool: pool, Publisher: pub})
	if err != nil {
		_ = pub.Close()
		return &configError{err}
	}

	var srv *metrics.Server
	srvDone := make(chan error, 1)
	if cfg.Metrics.Addr != "off" {
		srv, err = metrics.NewServer(cfg.Metrics.Addr, reg, r.Ready)
		if err != nil {
			_ = pub.Close() // Run would have closed it
			return fmt.Errorf("metrics.addr: cannot listen on %s: %w (choose a free port or \"off\")", cfg.Metrics.Addr, err)
		}
		srv.SetLiveness(r.Live)
		log.Info("serving metrics", zap.String("addr", srv.Addr()), zap.Strings("paths", []string{"/metrics", "/healthz", "/readyz"}))
		go func() { srvDone <- srv.Serve() }()
	}

	// A second SIGTERM/SIGINT after the first kills the process at once.
	context.AfterFunc(ctx, c.stopSignals)
	runErr := r.Run(ctx)

	if srv != nil {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		runErr = errors.Join(runErr, srv.Shutdown(sctx), <-srvDone)
	}
	if errors.Is(runErr, relay.ErrTableMissing) || errors.Is(runErr, relay.ErrSchemaOutdated) || errors.Is(runErr, relay.ErrPrivilegeMissing) || errors.Is(runErr, relay.ErrTransactionPooler) {
		log.Error("cannot start", zap.Error(runErr))
	}
	return runErr
}

func migrateUp(ctx context.Context, pg relay.PostgresConfig, log *zap.Logger) error {
	db, closeDB, err := openDB(ctx, pg)
	if err != nil {
		return err
	}
	defer closeDB()
	mig, err := schema.NewMigrator(db, pg.Schema, pg.Table)
	if err != nil {
		return err
	}
	res, err := mig.Up(ctx)
	if err != nil {
		return fmt.Errorf("migrate up: %w", err)
	}
	for _, r := range res {
		log.Info("migration applied", zap.Int64("version", r.Source.Version), zap.Duration("took", r.Duration))
	}
	return nil
}
