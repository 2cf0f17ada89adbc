package relay

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/internal/ident"
)

// HeaderReplay marks a re-published copy of an already dispatched event.
// Its value is the time of the replay (RFC 3339).
const HeaderReplay = "x-outbox-replay"

// ReplaySelection chooses dispatched events to publish again. Zero fields
// do not restrict.
type ReplaySelection struct {
	FromSeq, ToSeq int64     // inclusive seq range
	Since, Until   time.Time // created_at range: [Since, Until)
	Types          []string  // event types
}

// ReplayOptions tunes a replay.
type ReplayOptions struct {
	BatchSize int     // rows read and published per round; default 500
	Rate      float64 // most events per second; 0 means as fast as confirms allow
	// Progress, if set, is called after each confirmed batch.
	Progress func(ReplayProgress)
}

// ReplayProgress reports a replay's position. LastSeq is the highest seq
// confirmed so far: an interrupted replay resumes at LastSeq+1.
type ReplayProgress struct {
	Total, Done int64
	LastSeq     int64
	Elapsed     time.Duration
}

// Replayer re-publishes dispatched events of one table.
type Replayer struct {
	table ident.Table
	count string
	page  string
}

// NewReplayer returns a replayer for schema.table.
func NewReplayer(schema, table string) (*Replayer, error) {
	t := ident.Table{Schema: schema, Name: table}
	if err := t.Validate(); err != nil {
		return nil, err
	}
	return &Replayer{
		table: t,
		count: countReplay(t.Quoted()),
		page:  pageReplay(t.Quoted()),
	}, nil
}

func (r *Replayer) args(sel ReplaySelection, from int64) []any {
	var since, until *time.Time
	if !sel.Since.IsZero() {
		since = &sel.Since
	}
	if !sel.Until.IsZero() {
		until = &sel.Until
	}
	types := sel.Types
	if types == nil {
		types = []string{}
	}
	return []any{from, sel.ToSeq, since, until, types}
}

// Count returns how many events the selection matches (a dry run).
func (r *Replayer) Count(ctx context.Context, db Querier, sel ReplaySelection) (int64, error) {
	rows, err := db.Query(ctx, r.count, r.args(sel, sel.FromSeq)...)
	if err != nil {
		return 0, fmt.Errorf("count replay selection: %w", err)
	}
	n, err := pgx.CollectExactlyOneRow(rows, pgx.RowTo[int64])
	if err != nil {
		return 0, fmt.Errorf("count replay selection: %w", err)
	}
	return n, nil
}

// ErrReplayFailed is returned when the broker did not confirm part of a batch.
var ErrReplayFailed = errors.New("replay: publish not confirmed")

// Replay publishes the selected events again, in seq order, in batches with
// confirms, each message marked with HeaderReplay. The table is only read.
// It stops at the first batch the broker did not fully confirm, or when ctx
// is done; the returned progress says where to resume.
func (r *Replayer) Replay(ctx context.Context, db Querier, pub Publisher, sel ReplaySelection, opts ReplayOptions) (ReplayProgress, error) {
	if opts.BatchSize <= 0 {
		opts.BatchSize = 500
	}
	total, err := r.Count(ctx, db, sel)
	if err != nil {
		return ReplayProgress{}, err
	}
	p := ReplayProgress{Total: total, LastSeq: sel.FromSeq - 1}
	start := time.Now()
	stamp := start.UTC().Format(time.RFC3339)
	for ctx.Err() == nil {
		msgs, err := r.readPage(ctx, db, sel, p.LastSeq+1, opts.BatchSize)
		if err != nil {
			return p, err
		}
		if len(msgs) == 0 {
			break
		}
		for i := range msgs {
			msgs[i].Headers[HeaderReplay] = stamp
		}
		// Confirmed messages are counted up to the first failure, so the
		// resume point never skips an unconfirmed event.
		errs := Publish(ctx, pub, msgs)
		for i, m := range msgs {
			if errs[i] != nil {
				return p, fmt.Errorf("%w: event %s (seq %d): %v", ErrReplayFailed, m.ID, m.Seq, errs[i])
			}
			p.Done++
			p.LastSeq = m.Seq
		}
		p.Elapsed = time.Since(start)
		if opts.Progress != nil {
			opts.Progress(p)
		}
		if opts.Rate > 0 {
			ahead := time.Duration(float64(p.Done)/opts.Rate*float64(time.Second)) - time.Since(start)
			if ahead > 0 {
				select {
				case <-ctx.Done():
				case <-time.After(ahead):
				}
			}
		}
	}
	p.Elapsed = time.Since(start)
	return p, ctx.Err()
}

func (r *Replayer) readPage(ctx context.Context, db Querier, sel ReplaySelection, from int64, limit int) ([]Message, error) {
	rows, err := db.Query(ctx, r.page, append(r.args(sel, from), limit)...)
	if err != nil {
		return nil, fmt.Errorf("read replay page: %w", err)
	}
	defer rows.Close()
	var msgs []Message
	for rows.Next() {
		m, err := scanMessage(rows)
		if err != nil {
			return nil, fmt.Errorf("read replay page: seq %d: %w", m.Seq, err)
		}
		msgs = append(msgs, m)
	}
	return msgs, rows.Err()
}
