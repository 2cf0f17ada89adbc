package relay

import (
	"context"
	"errors"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"

	"github.com/outbox-relay/outbox-relay/metrics"
)

// cleanLoop deletes dispatched and dead rows past their retention, in
// bounded batches on short transactions of their own.
func (r *Relay) cleanLoop(ctx context.Context, pool *pgxpool.Pool) {
	t := time.NewTicker(r.cfg.Retention.Interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if r.cfg.Relay.OnDispatch == OnDispatchMark {
			r.cleanDispatched(ctx, pool)
		}
		if r.cfg.Retention.Dead > 0 {
			r.cleanDead(ctx, pool)
		}
	}
}

// cleanDispatched deletes dispatched rows past retention.dispatched, one
// page of retention.batch_size rows (by seq) per statement, from the oldest
// until the rows are too recent (queries.cleanDispatched). It returns the
// rows deleted and the pages read.
func (r *Relay) cleanDispatched(ctx context.Context, pool *pgxpool.Pool) (total, pages int64) {
	keep := r.cfg.Retention.Dispatched
	var after int64
	for ctx.Err() == nil {
		pages++
		var deleted, last, rows int64
		var recent bool
		err := pgx.BeginTxFunc(ctx, pool, writeTx, func(tx pgx.Tx) error {
			return tx.QueryRow(ctx, r.q.cleanDispatched, keep.Milliseconds(), r.cfg.Retention.BatchSize,
				after, r.cleanerLock).Scan(&deleted, &last, &rows, &recent)
		})
		if err != nil {
			r.cleanFailed(err, metrics.CleanDispatched)
			return total, pages
		}
		total += deleted
		r.m.Cleaned.WithLabelValues(metrics.CleanDispatched).Add(float64(deleted))
		if rows < int64(r.cfg.Retention.BatchSize) || (deleted == 0 && recent) {
			break
		}
		after = last
	}
	r.cleaned(metrics.CleanDispatched, total, keep)
	return total, pages
}

// cleanDead deletes dead rows past retention.dead, through the dead index.
func (r *Relay) cleanDead(ctx context.Context, pool *pgxpool.Pool) {
	keep := r.cfg.Retention.Dead
	total := int64(0)
	for ctx.Err() == nil {
		var tag pgconn.CommandTag
		err := pgx.BeginTxFunc(ctx, pool, writeTx, func(tx pgx.Tx) (err error) {
			tag, err = tx.Exec(ctx, r.q.cleanDead, keep.Milliseconds(), r.cfg.Retention.BatchSize)
			return err
		})
		if err != nil {
			r.cleanFailed(err, metrics.CleanDead)
			return
		}
		n := tag.RowsAffected()
		total += n
		r.m.Cleaned.WithLabelValues(metrics.CleanDead).Add(float64(n))
		if n < int64(r.cfg.Retention.BatchSize) {
			break
		}
	}
	r.cleaned(metrics.CleanDead, total, keep)
}

func (r *Relay) cleanFailed(err error, kind string) {
	if !errors.Is(err, context.Canceled) && !isUndefinedTable(err) {
		r.log.Warn("retention cleaner", zap.String("kind", kind), zap.Error(err))
	}
}

func (r *Relay) cleaned(kind string, total int64, keep time.Duration) {
	if total > 0 {
		r.log.Info("retention cleaner deleted rows", zap.String("kind", kind), zap.Int64("rows", total), zap.Duration("older_than", keep))
	}
}
