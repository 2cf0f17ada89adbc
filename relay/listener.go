package relay

import (
	"context"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/metrics"
)

// listener keeps a dedicated LISTEN connection (notify mode), waking the
// claim loop on every notification and once after each (re)connect, since
// notifications sent while it was down are lost.
type listener struct {
	connCfg *pgx.ConnConfig
	channel string                       // the table's channel, quoted
	wake    func(src string)             // wakes the claim loop
	setLink func(link string, err error) // records the listen link's state
}

func (l *listener) run(ctx context.Context) {
	failures := 0
	for ctx.Err() == nil {
		conn, err := pgx.ConnectConfig(ctx, l.connCfg)
		if err == nil {
			if _, err = conn.Exec(ctx, "LISTEN "+l.channel); err != nil {
				_ = conn.Close(context.WithoutCancel(ctx))
			}
		}
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			l.setLink(metrics.LinkListen, err)
			failures++
			sleep(ctx, reconnectDelay(failures))
			continue
		}
		failures = 0
		l.setLink(metrics.LinkListen, nil)
		l.wake(metrics.WakeReconnect)
		for {
			if _, err = conn.WaitForNotification(ctx); err != nil {
				break
			}
			l.wake(metrics.WakeNotify)
		}
		_ = conn.Close(context.WithoutCancel(ctx))
		if ctx.Err() != nil {
			return
		}
		l.setLink(metrics.LinkListen, err)
	}
}

// signal wakes the claim loop without blocking; wake-ups coalesce.
func (r *Relay) signal(src string) {
	select {
	case r.wake <- src:
	default:
	}
}
