package relay

import (
	"context"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/metrics"
)

// listen keeps a dedicated LISTEN connection (notify mode), waking the claim
// loop on every notification and once after each (re)connect, since
// notifications sent while it was down are lost.
func (r *Relay) listen(ctx context.Context, connCfg *pgx.ConnConfig) {
	channel := pgx.Identifier{r.table.Channel()}.Sanitize()
	failures := 0
	for ctx.Err() == nil {
		conn, err := pgx.ConnectConfig(ctx, connCfg)
		if err == nil {
			if _, err = conn.Exec(ctx, "LISTEN "+channel); err != nil {
				_ = conn.Close(context.WithoutCancel(ctx))
			}
		}
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			r.setLink(metrics.LinkListen, err)
			failures++
			sleep(ctx, r.reconnectDelay(failures))
			continue
		}
		failures = 0
		r.setLink(metrics.LinkListen, nil)
		r.signal(metrics.WakeReconnect)
		for {
			if _, err = conn.WaitForNotification(ctx); err != nil {
				break
			}
			r.signal(metrics.WakeNotify)
		}
		_ = conn.Close(context.WithoutCancel(ctx))
		if ctx.Err() != nil {
			return
		}
		r.setLink(metrics.LinkListen, err)
	}
}
