package relay

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
)

// claim locks the next due rows and turns them into messages, up to budget
// payload bytes: of the locked rows, in seq order, those whose payloads add
// up to at most budget, or the first alone however large when alone is set
// (nothing else is in flight). Rows whose headers cannot be decoded, or
// whose payload is over amqp.max_message_size (never loaded), come back as
// invalid failures. Locked rows past the budget stay locked, unsent, until
// the batch settles; the next claim skips them.
//
// The budget is kept here rather than in SQL (a window over the locked
// rows, which needed them materialized: about 1 µs of the database's time
// per event). So that the rows past the budget cannot cost more than the
// budget on the wire, the claim returns a payload only up to
// budget/relay.batch_size bytes; a larger payload that fits is read
// afterwards (readPayloads).
func (r *Relay) claim(ctx context.Context, tx pgx.Tx, budget int64, alone bool) (msgs []Message, invalid []failure, err error) {
	limit := r.cfg.Relay.BatchSize
	inline := min(payloadPiece, max(budget/int64(limit), 1))
	ordered := r.cfg.Relay.Ordering == OrderingPartitionKey
	var heads []int64
	if ordered {
		if heads, err = r.ord.findHeads(ctx, tx); err != nil {
			return nil, nil, err
		}
	}
	floor := int64(0)
	if !ordered {
		floor = r.floor.next(time.Now())
	}
	var c claimed
	for {
		var rows pgx.Rows
		if ordered {
			rows, err = tx.Query(ctx, r.q.claimOrdered, limit, r.cfg.Relay.Partitions,
				r.ord.leases.owner, strconv.FormatInt(r.cfg.Relay.LeaseTimeout.Milliseconds(), 10),
				r.ord.leases.claimMargin().Milliseconds(), heads, inline)
		} else {
			rows, err = tx.Query(ctx, r.q.claimBatch, limit, floor, inline)
		}
		if err != nil {
			return nil, nil, fmt.Errorf("claim batch: %w", err)
		}
		if c, err = r.take(rows, budget, alone); err != nil {
			return nil, nil, err
		}
		if c.locked > 0 || floor == 0 {
			break
		}
		// Nothing above the floor, but rows may be due below it: claim
		// from the start now, as the loop would not look again before
		// wake.poll_interval with nothing in flight.
		r.floor.claimed(0, false)
		floor = r.floor.next(time.Now())
	}
	if err := r.readPayloads(ctx, tx, c.msgs, c.left); err != nil {
		return nil, nil, err
	}
	if bySeq := func(a, b Message) int { return cmp.Compare(a.Seq, b.Seq) }; !slices.IsSortedFunc(c.msgs, bySeq) {
		slices.SortFunc(c.msgs, bySeq)
	}
	if !ordered {
		r.floor.claimed(top(c.msgs, c.invalid), c.locked >= limit)
	}
	return c.msgs, c.invalid, nil
}

// claimed is what take made of a claim's rows.
type claimed struct {
	msgs    []Message
	invalid []failure
	locked  int   // rows the claim locked
	left    []int // msgs whose payload the claim left out
}

// take reads a claim's rows (and closes them): the messages within budget
// (see claim), the rows to park, and how many rows were locked.
func (r *Relay) take(rows pgx.Rows, budget int64, alone bool) (claimed, error) {
	defer rows.Close()
	var (
		c     claimed
		taken int64 // payload bytes of the rows counted against budget
		over  bool  // budget reached: the rows after stay unsent
	)
	maxSize := int64(r.cfg.AMQP.MaxMessageSize)
	for rows.Next() {
		c.locked++
		var size int64
		if over {
			// Past the budget only a row to park is wanted: read the size
			// alone (the last column), not the payload.
			dst := make([]any, len(rows.FieldDescriptions()))
			dst[len(dst)-1] = &size
			if err := rows.Scan(dst...); err != nil {
				return c, fmt.Errorf("claim batch: %w", err)
			}
			if size <= maxSize {
				continue
			}
		}
		var tid pgtype.TID
		m, err := scanMessage(rows, &tid, &size)
		m.tid = tid
		var bad *PublishError
		switch {
		case err != nil && !errors.As(err, &bad):
			return c, fmt.Errorf("claim batch: %w", err)
		case size > maxSize:
			// Parked at settle, without ever loading the payload.
			c.invalid = append(c.invalid, failure{msg: m, err: &PublishError{Reason: ReasonTooLarge, Err: fmt.Errorf(
				"payload is %d bytes, over amqp.max_message_size (%d); parked without loading it", size, maxSize)}})
		case taken+size > budget && !(alone && taken == 0):
			over = true
		case bad != nil:
			taken += size
			c.invalid = append(c.invalid, failure{msg: m, err: bad})
		default:
			taken += size
			if m.Body == nil {
				m.Body = make([]byte, 0, size)
				c.left = append(c.left, len(c.msgs))
			}
			c.msgs = append(c.msgs, m)
		}
	}
	if err := rows.Err(); err != nil {
		return c, fmt.Errorf("claim batch: %w", err)
	}
	return c, nil
}

// readPayloads reads the payloads the claim left out, of msgs[left]: those
// up to payloadPiece bytes in one statement, larger ones in pieces.
func (r *Relay) readPayloads(ctx context.Context, tx pgx.Tx, msgs []Message, left []int) error {
	bySeq := make(map[int64]*Message)
	var seqs []int64
	for _, i := range left {
		if m := &msgs[i]; cap(m.Body) <= payloadPiece {
			bySeq[m.Seq] = m
			seqs = append(seqs, m.Seq)
		} else if err := r.readLargePayload(ctx, tx, m); err != nil {
			return err
		}
	}
	if len(seqs) == 0 {
		return nil
	}
	rows, err := tx.Query(ctx, r.q.readPayloads, pgx.QueryResultFormats{pgx.BinaryFormatCode, pgx.BinaryFormatCode}, seqs)
	if err != nil {
		return fmt.Errorf("read payloads: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var seq int64
		if err := rows.Scan(&seq, nil); err != nil {
			return fmt.Errorf("read payloads: %w", err)
		}
		if m := bySeq[seq]; m != nil {
			m.Body = append(m.Body, rows.RawValues()[1]...)
			delete(bySeq, seq)
		}
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("read payloads: %w", err)
	}
	if len(bySeq) > 0 {
		return fmt.Errorf("read payloads: %d of %d rows not found", len(bySeq), len(seqs))
	}
	return nil
}

// readLargePayload reads a payload the claim left out for its size into
// m.Body, payloadPiece bytes at a time: read whole, pgx would hold it twice
// (in its read buffer, kept until the connection's next read, and the copy).
func (r *Relay) readLargePayload(ctx context.Context, tx pgx.Tx, m *Message) error {
	for len(m.Body) < cap(m.Body) {
		rows, err := tx.Query(ctx, r.q.readPayloadPiece, pgx.QueryResultFormats{pgx.BinaryFormatCode},
			m.Seq, len(m.Body)+1, payloadPiece)
		if err != nil {
			return fmt.Errorf("read payload of seq %d: %w", m.Seq, err)
		}
		n := len(m.Body)
		if rows.Next() {
			m.Body = append(m.Body, rows.RawValues()[0]...)
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return fmt.Errorf("read payload of seq %d: %w", m.Seq, err)
		}
		if len(m.Body) == n {
			return fmt.Errorf("read payload of seq %d: %d of %d bytes, then nothing", m.Seq, n, cap(m.Body))
		}
	}
	return nil
}
