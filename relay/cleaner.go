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

// cleaner deletes dispatched and dead rows past their retention, in
// bounded batches on short transactions of their own.
type cleaner struct {
	pool       *pgxpool.Pool
	q          *queries
	cfg        RetentionConfig
	onDispatch string // relay.on_dispatch: with delete, no dispatched row stays
	lock       int32  // lockClass of the advisory lock that lets one replica's cleaner run at a time
	m          *metrics.Metrics
	log        *zap.Logger
}

// cleaner is the relay's retention cleaner, cleaning through pool.
func (r *Relay) cleaner(pool *pgxpool.Pool) *cleaner {
	return &cleaner{
		pool:       pool,
		q:          &r.q,
		cfg:        r.cfg.Retention,
		onDispatch: r.cfg.Relay.OnDispatch,
		lock:       r.cleanerLock,
		m:          r.m,
		log:        r.log,
	}
}

func (c *cleaner) run(ctx context.Context) {
	t := time.NewTicker(c.cfg.Interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if c.onDispatch == OnDispatchMark {
			// One log line for both tables' dispatched rows.
			archived, _ := c.cleanArchived(ctx)
			inPlace, _ := c.cleanDispatched(ctx)
			c.cleaned(metrics.CleanDispatched, archived+inPlace, c.cfg.Dispatched)
		}
		if c.cfg.Dead > 0 {
			c.cleanDead(ctx)
		}
	}
}

// cleanArchived deletes archived rows (the dispatched ones, moved there by
// the mark) past retention.dispatched, one page of retention.batch_size
// rows (by seq) per statement, from the oldest until the rows are too
// recent (queries.cleanArchived). It returns the rows deleted and the
// pages read.
func (c *cleaner) cleanArchived(ctx context.Context) (total, pages int64) {
	return c.walk(ctx, c.q.cleanArchived)
}

// cleanDispatched deletes the dispatched rows an older relay left in the
// outbox table (marked in place) past retention.dispatched, one
// page of retention.batch_size rows (by seq) per statement, from the oldest
// until the rows are too recent (queries.cleanDispatched). It returns the
// rows deleted and the pages read.
func (c *cleaner) cleanDispatched(ctx context.Context) (total, pages int64) {
	return c.walk(ctx, c.q.cleanDispatched)
}

// walk runs the paged retention query q (cleanDispatched, cleanArchived)
// from the lowest seq until a page says the rest is too recent.
func (c *cleaner) walk(ctx context.Context, q string) (total, pages int64) {
	keep := c.cfg.Dispatched
	var after int64
	for ctx.Err() == nil {
		pages++
		var deleted, last, rows int64
		var recent bool
		err := pgx.BeginTxFunc(ctx, c.pool, writeTx, func(tx pgx.Tx) error {
			return tx.QueryRow(ctx, q, keep.Milliseconds(), c.cfg.BatchSize,
				after, c.lock).Scan(&deleted, &last, &rows, &recent)
		})
		if err != nil {
			c.cleanFailed(err, metrics.CleanDispatched)
			return total, pages
		}
		total += deleted
		c.m.Cleaned.WithLabelValues(metrics.CleanDispatched).Add(float64(deleted))
		if rows < int64(c.cfg.BatchSize) || (deleted == 0 && recent) {
			break
		}
		after = last
	}
	return total, pages
}

// cleanDead deletes dead rows past retention.dead, through the dead index.
func (c *cleaner) cleanDead(ctx context.Context) {
	keep := c.cfg.Dead
	total := int64(0)
	for ctx.Err() == nil {
		var tag pgconn.CommandTag
		err := pgx.BeginTxFunc(ctx, c.pool, writeTx, func(tx pgx.Tx) (err error) {
			tag, err = tx.Exec(ctx, c.q.cleanDead, keep.Milliseconds(), c.cfg.BatchSize)
			return err
		})
		if err != nil {
			c.cleanFailed(err, metrics.CleanDead)
			return
		}
		n := tag.RowsAffected()
		total += n
		c.m.Cleaned.WithLabelValues(metrics.CleanDead).Add(float64(n))
		if n < int64(c.cfg.BatchSize) {
			break
		}
	}
	c.cleaned(metrics.CleanDead, total, keep)
}

func (c *cleaner) cleanFailed(err error, kind string) {
	if !errors.Is(err, context.Canceled) && !isUndefinedTable(err) {
		c.log.Warn("retention cleaner", zap.String("kind", kind), zap.Error(err))
	}
}

func (c *cleaner) cleaned(kind string, total int64, keep time.Duration) {
	if total > 0 {
		c.log.Info("retention cleaner deleted rows", zap.String("kind", kind), zap.Int64("rows", total), zap.Duration("older_than", keep))
	}
}
