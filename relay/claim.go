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
	var rows pgx.Rows
	if r.cfg.Relay.Ordering == OrderingPartitionKey {
		var heads []int64
		if heads, err = r.ord.findHeads(ctx, tx); err != nil {
			return nil, nil, err
		}
		rows, err = tx.Query(ctx, r.q.claimOrdered, limit, r.cfg.Relay.Partitions,
			r.ord.leases.owner, strconv.FormatInt(r.cfg.Relay.LeaseTimeout.Milliseconds(), 10),
			r.ord.leases.claimMargin().Milliseconds(), heads, inline)
	} else {
		rows, err = tx.Query(ctx, r.q.claimBatch, limit, r.floor.next(time.Now()), inline)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("claim batch: %w", err)
	}
	defer rows.Close()
	var (
		locked int   // rows the claim locked
		taken  int64 // payload bytes of the rows counted against budget
		over   bool  // budget reached: the rows after stay unsent
		left   []int // msgs whose payload the claim left out
	)
	maxSize := int64(r.cfg.AMQP.MaxMessageSize)
	for rows.Next() {
		locked++
		var size int64
		m, err := scanMessage(rows, &size)
		var bad *PublishError
		switch {
		case err != nil && !errors.As(err, &bad):
			return nil, nil, fmt.Errorf("claim batch: %w", err)
		case size > maxSize:
			// Parked at settle, without ever loading the payload.
			invalid = append(invalid, failure{msg: m, err: &PublishError{Reason: ReasonTooLarge, Err: fmt.Errorf(
				"payload is %d bytes, over amqp.max_message_size (%d); parked without loading it", size, maxSize)}})
		case over || (taken+size > budget && !(alone && taken == 0)):
			over = true
		case bad != nil:
			taken += size
			invalid = append(invalid, failure{msg: m, err: bad})
		default:
			taken += size
			if m.Body == nil {
				m.Body = make([]byte, 0, size)
				left = append(left, len(msgs))
			}
			msgs = append(msgs, m)
		}
	}
	if err := rows.Err(); err != nil {
		return nil, nil, fmt.Errorf("claim batch: %w", err)
	}
	if err := r.readPayloads(ctx, tx, msgs, left); err != nil {
		return nil, nil, err
	}
	if bySeq := func(a, b Message) int { return cmp.Compare(a.Seq, b.Seq) }; !slices.IsSortedFunc(msgs, bySeq) {
		slices.SortFunc(msgs, bySeq)
	}
	r.floor.claimed(top(msgs, invalid), locked >= limit)
	return msgs, invalid, nil
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
	for seq, m := range bySeq {
		return fmt.Errorf("read payloads: seq %d (%d bytes) not found", seq, cap(m.Body))
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
