package ops

import (
	"context"
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/relay"
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
	BatchSize int // rows read per page; default 500
	// Rate is the most events per second; 0 means as fast as confirms
	// allow. It holds per message, not per page: a page is sent in small
	// slices (about 20 a second, Rate/20 events, at least 1), each when
	// the previous one's share of time is up, so no window of time sees
	// more than Rate per second plus one slice; time lost to slow confirms
	// is not made up in a burst.
	Rate float64
	// Progress, if set, is called after each send the broker confirmed in
	// full: a page, or with Rate a slice of one.
	Progress func(ReplayProgress)
	// OneExchange sends every copy to the publisher's exchange (replay
	// --exchange), ignoring the rows' exchange overrides; routing keys stay.
	// Otherwise each copy follows its row's route, as the first time.
	OneExchange bool
}

// ReplayProgress reports a replay's position.
type ReplayProgress struct {
	Total, Done int64
	// LastSeq is the highest seq confirmed so far; every selected event
	// up to it was confirmed.
	LastSeq int64
	// Resume is where an interrupted replay continues (its FromSeq): the
	// first selected seq not known to be confirmed. Nothing below it is sent
	// again by resuming there. After a partial failure it is the seq of the
	// first failed event, and Resent counts the events above it that the
	// broker did confirm in the same send: resuming sends those again.
	Resume  int64
	Resent  int
	Elapsed time.Duration
}

// Replayer re-publishes dispatched events of one table.
type Replayer struct {
	count string
	page  string
}

// NewReplayer returns a replayer for schema.table.
func NewReplayer(schema, table string) (*Replayer, error) {
	o, err := New(schema, table)
	if err != nil {
		return nil, err
	}
	return o.Replayer(), nil
}

// Replayer returns a replayer for the table.
func (o *Outbox) Replayer() *Replayer {
	return &Replayer{count: o.q.replayCount, page: o.q.replayPage}
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
func (r *Replayer) Count(ctx context.Context, db DB, sel ReplaySelection) (int64, error) {
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

// slicesPerSecond is how finely Replay paces a rate-limited replay.
const slicesPerSecond = 20

// Replay publishes the selected events again, in seq order, with confirms,
// each message marked with HeaderReplay. The table is only read. It stops
// at the first send the broker did not fully confirm, or when ctx is done
// (a send in flight is settled first, within amqp.confirm_timeout); the
// returned progress says where to resume.
func (r *Replayer) Replay(ctx context.Context, db DB, pub relay.Publisher, sel ReplaySelection, opts ReplayOptions) (ReplayProgress, error) {
	if opts.BatchSize <= 0 {
		opts.BatchSize = 500
	}
	slice := opts.BatchSize
	if opts.Rate > 0 {
		slice = min(max(int(math.Ceil(opts.Rate/slicesPerSecond)), 1), opts.BatchSize)
	}
	p := ReplayProgress{LastSeq: sel.FromSeq - 1, Resume: max(sel.FromSeq, 1)}
	total, err := r.Count(ctx, db, sel)
	if err != nil {
		return p, err
	}
	p.Total = total
	start := time.Now()
	stamp := start.UTC().Format(time.RFC3339)
	next := start // when the next slice may go (with Rate)
	stop := func(err error) (ReplayProgress, error) {
		p.Elapsed = time.Since(start)
		return p, err
	}
	for ctx.Err() == nil {
		msgs, err := r.readPage(ctx, db, sel, p.Resume, opts.BatchSize)
		if err != nil {
			return stop(err)
		}
		if len(msgs) == 0 {
			break
		}
		for i := range msgs {
			msgs[i].Headers[HeaderReplay] = stamp
			if opts.OneExchange {
				msgs[i].Exchange = ""
			}
		}
		for len(msgs) > 0 {
			n := min(slice, len(msgs))
			if opts.Rate > 0 {
				// A slice of n events uses n/Rate of time. A replay that
				// fell behind (slow confirms) does not catch up in a burst.
				select {
				case <-ctx.Done():
				case <-time.After(time.Until(next)):
				}
				if now := time.Now(); now.After(next) {
					next = now
				}
				next = next.Add(time.Duration(float64(n) / opts.Rate * float64(time.Second)))
			}
			if ctx.Err() != nil {
				return stop(ctx.Err())
			}
			if err := r.send(ctx, pub, msgs[:n], &p); err != nil {
				return stop(err)
			}
			msgs = msgs[n:]
			if opts.Progress != nil {
				p.Elapsed = time.Since(start)
				opts.Progress(p)
			}
		}
	}
	return stop(ctx.Err())
}

// send publishes msgs and waits for their confirms, even once ctx is done
// (the wait is bounded by the confirm timeout), so that an interrupted
// replay knows exactly what was confirmed. It advances p over the confirmed
// prefix; at the first failure it returns an error and leaves p.Resume at
// the failed event.
func (r *Replayer) send(ctx context.Context, pub relay.Publisher, msgs []relay.Message, p *ReplayProgress) error {
	errs := pub.Send(ctx, msgs).Wait(context.WithoutCancel(ctx))
	for i, m := range msgs {
		if err := errs[i]; !delivered(err) {
			for _, later := range errs[i+1:] {
				if delivered(later) {
					p.Resent++
				}
			}
			p.Resume = m.Seq
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("%w: event %s (seq %d): %v", ErrReplayFailed, m.ID, m.Seq, err)
		}
		p.Done++
		p.LastSeq = m.Seq
		p.Resume = m.Seq + 1
	}
	return nil
}

// delivered reports a send's result that counts as delivered: confirmed, or
// a return that amqp.unroutable: accept accepts, as the engine counts it.
func delivered(err error) bool {
	var pe *relay.PublishError
	return err == nil || errors.As(err, &pe) && pe.Accepted
}

func (r *Replayer) readPage(ctx context.Context, db DB, sel ReplaySelection, from int64, limit int) ([]relay.Message, error) {
	rows, err := db.Query(ctx, r.page, append(r.args(sel, from), limit)...)
	if err != nil {
		return nil, fmt.Errorf("read replay page: %w", err)
	}
	defer rows.Close()
	var msgs []relay.Message
	for rows.Next() {
		m, err := relay.ScanMessage(rows)
		if err != nil {
			return nil, fmt.Errorf("read replay page: seq %d: %w", m.Seq, err)
		}
		msgs = append(msgs, m)
	}
	return msgs, rows.Err()
}
