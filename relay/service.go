package relay

import (
	"context"
	"sync"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// A service is one of the relay's background loops (stats.go, cleaner.go,
// listener.go): a small type holding what it uses, whose run returns once
// ctx is done. Run starts them before the claim loop and stops them after.
type service interface {
	run(ctx context.Context)
}

// services are the background loops this configuration needs, in order of
// start.
func (r *Relay) services(pool *pgxpool.Pool, connCfg *pgx.ConnConfig) []service {
	var svcs []service
	if r.cfg.Wake.Mode == WakeNotify {
		svcs = append(svcs, &listener{
			connCfg: connCfg,
			channel: pgx.Identifier{r.table.Channel()}.Sanitize(),
			wake:    r.signal,
			setLink: r.setLink,
		})
	}
	svcs = append(svcs, &statsReader{
		pool:     pool,
		q:        &r.q,
		owner:    r.statsOwner,
		interval: r.cfg.Relay.StatsInterval,
		m:        r.m,
		log:      r.log,
	})
	if *r.cfg.Retention.Enabled {
		svcs = append(svcs, r.cleaner(pool))
	}
	return svcs
}

// startServices runs each service in a goroutine of its own, under ctx.
// stop cancels them and waits for each to return, in reverse order of
// start; it may be called more than once.
func startServices(ctx context.Context, svcs []service) (stop func()) {
	type running struct {
		cancel context.CancelFunc
		done   chan struct{}
	}
	rs := make([]running, 0, len(svcs))
	for _, s := range svcs {
		sctx, cancel := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() {
			defer close(done)
			s.run(sctx)
		}()
		rs = append(rs, running{cancel, done})
	}
	return sync.OnceFunc(func() {
		for i := len(rs) - 1; i >= 0; i-- {
			rs[i].cancel()
			<-rs[i].done
		}
	})
}
