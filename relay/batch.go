package relay

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"

	"github.com/outbox-relay/outbox-relay/metrics"
)

// A batch's path, in this file: claimAndSend → claim, then Send; the
// settler's settle → record, in the claim's transaction.

// batch is a claimed batch on its way: its transaction holds the rows'
// locks until settle commits the outcome.
type batch struct {
	tx      pgx.Tx
	msgs    []Message
	invalid []failure
	bytes   int64 // payload bytes of msgs, counted in Relay.inflightBytes
	pending Pending
	claimed time.Time // claim began
	done    []int64   // rows committed as dispatched, once settled
	sent    time.Time // publish began
}

// size is the number of rows claimed; 0 for no batch.
func (b *batch) size() int {
	if b == nil {
		return 0
	}
	return len(b.msgs) + len(b.invalid)
}

// claimAndSend claims the next batch and publishes it without waiting for
// confirms. It returns nil when nothing is due. With probe, a cheap query
// without a transaction first checks that something is due.
func (r *Relay) claimAndSend(ctx, drain context.Context, pool *pgxpool.Pool, probe bool) (*batch, error) {
	if probe {
		var due bool
		if err := pool.QueryRow(ctx, r.q.probePending).Scan(&due); err != nil {
			return nil, r.pgFailed(fmt.Errorf("probe pending: %w", err))
		}
		r.setLink(metrics.LinkPostgres, nil)
		if !due {
			return nil, nil
		}
	}
	// Claims stop at relay.batch_bytes, counting the batches in flight; a
	// row larger than that goes alone, when nothing else is held.
	held := r.inflightBytes.Load()
	budget := r.cfg.Relay.BatchBytes - held
	for budget <= 0 && held > 0 {
		if !r.waitSettled(ctx) {
			return nil, nil
		}
		held = r.inflightBytes.Load()
		budget = r.cfg.Relay.BatchBytes - held
	}
	b := &batch{claimed: time.Now()}
	tx, err := pool.BeginTx(ctx, writeTx)
	if err != nil {
		return nil, r.pgFailed(fmt.Errorf("begin: %w", err))
	}
	b.tx = tx
	b.msgs, b.invalid, err = r.claim(ctx, tx, budget, held == 0)
	if err == nil && r.cfg.Relay.Ordering == OrderingPartitionKey {
		n := b.size()
		b.msgs, b.invalid, err = r.ord.gate(ctx, pool, tx, b.msgs, b.invalid)
		r.ord.held = n - b.size()
		r.ord.requeue(b.msgs)
	}
	if err != nil {
		_ = tx.Rollback(drain)
		return nil, r.pgFailed(err)
	}
	r.setLink(metrics.LinkPostgres, nil)
	r.m.StageDuration.WithLabelValues(metrics.StageClaim).Observe(time.Since(b.claimed).Seconds())
	if b.size() == 0 {
		// Nothing is due, or nothing fitted beside the batches in flight:
		// the claim loop waits, and looks again when one settles.
		return nil, tx.Commit(drain)
	}
	if r.cfg.Relay.Ordering == OrderingPartitionKey && time.Since(b.claimed) >= r.ord.leases.claimMargin() {
		// The claim vouched for its leases for claimMargin only: stalled
		// since (GC, SIGSTOP), this process may have lost them to another
		// replica, and the server may have ended this transaction.
		_ = tx.Rollback(drain)
		r.log.Warn("claimed batch dropped: not sent while its partition leases were certain",
			zap.Int("batch_size", b.size()), zap.Duration("since_claim", time.Since(b.claimed)))
		return nil, nil
	}
	for _, m := range b.msgs {
		b.bytes += int64(len(m.Body))
	}
	r.inflightBytes.Add(b.bytes)
	r.m.BatchSize.Observe(float64(b.size()))
	b.sent = time.Now()
	sendCtx := drain
	if r.cfg.Relay.Ordering == OrderingPartitionKey {
		// Every message, not only the batch, goes out while the claim
		// vouches for its leases: Send may wait for confirms
		// (amqp.max_unconfirmed), and what it has not sent by then is
		// claimed again.
		var cancel context.CancelFunc
		sendCtx, cancel = context.WithDeadline(drain, b.claimed.Add(r.ord.leases.claimMargin()))
		defer cancel()
	}
	b.pending = r.pub.Send(sendCtx, b.msgs)
	return b, nil
}

// settler settles the sent batches in order until sent is closed. It reports
// failures on errs without blocking: the loop backs off once for any number.
func (r *Relay) settler(ctx, drain context.Context, sent <-chan *batch, errs chan<- error) {
	for b := range sent {
		msgs := b.msgs // settle lets go of them
		err := r.settle(ctx, drain, b)
		r.inflightBytes.Add(-b.bytes)
		// Counted out, and its keys noted, before the signal: a claim
		// loop that sees the batch in flight gets the signal after it.
		r.inflight.Add(-1)
		if r.ord != nil {
			r.ord.noteSettled(msgs, b.done)
		}
		select {
		case r.settled <- struct{}{}:
		default:
		}
		if err != nil {
			if schemaFailure(err) {
				r.recheck.Store(true) // before the loop hears of the failure
			}
			select {
			case errs <- err:
			default:
			}
		}
	}
}

// waitSettled waits until a batch in flight settles; false when ctx is done.
func (r *Relay) waitSettled(ctx context.Context) bool {
	select {
	case <-r.settled:
		return true
	case <-ctx.Done():
		return false
	}
}

// settle waits for a sent batch's confirms and records the outcome in its
// transaction: confirmed rows dispatched, failed rows retried or parked,
// rows whose link dropped left untouched. It always ends the transaction.
func (r *Relay) settle(ctx, drain context.Context, b *batch) error {
	defer func() {
		_ = b.tx.Rollback(drain)
		// The payloads go now: relay.batch_bytes counts them free from here.
		b.msgs, b.pending = nil, nil
	}()
	waitCtx := drain
	if r.cfg.Relay.Ordering == OrderingPartitionKey {
		// The claim transaction may stay idle for relay.lease_timeout only
		// (claimOrdered): settle well before the server ends it.
		var cancel context.CancelFunc
		waitCtx, cancel = context.WithDeadline(drain, b.claimed.Add(r.cfg.Relay.LeaseTimeout*3/4))
		defer cancel()
	}
	errs := b.pending.Wait(waitCtx)
	confirmedAt := time.Now()
	r.m.PublishLatency.Observe(confirmedAt.Sub(b.sent).Seconds())
	r.m.StageDuration.WithLabelValues(metrics.StagePublish).Observe(confirmedAt.Sub(b.sent).Seconds())

	var (
		done     []int64 // seqs
		tids     []pgtype.TID
		failed   []failure
		linkDown error
	)
	for i, m := range b.msgs {
		if accepted(errs[i]) {
			r.m.Returned.WithLabelValues(r.m.EventType(m.Type)).Inc()
			errs[i] = nil
		}
		if errs[i] == nil {
			done, tids = append(done, m.Seq), append(tids, m.tid)
			r.m.Published.WithLabelValues(r.m.EventType(m.Type)).Inc()
			r.m.EndToEndLatency.Observe(confirmedAt.Sub(m.CreatedAt).Seconds())
			continue
		}
		pe := reasonOf(errs[i])
		if pe.Deferred {
			continue // cut off by another message's close: retried as it is
		}
		r.m.Failed.WithLabelValues(r.m.EventType(m.Type), string(pe.Reason)).Inc()
		if pe.Reason == ReasonUnroutable {
			r.m.Returned.WithLabelValues(r.m.EventType(m.Type)).Inc()
		}
		if pe.Transient() {
			linkDown = pe // untouched: retried as it is, no attempt charged
			continue
		}
		failed = append(failed, failure{msg: m, err: pe})
	}
	for _, f := range b.invalid {
		r.m.Failed.WithLabelValues(r.m.EventType(f.msg.Type), string(f.err.Reason)).Inc()
	}
	failed = append(failed, b.invalid...)

	bookCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	if err := r.record(bookCtx, b.tx, done, tids, failed); err != nil {
		return r.pgFailed(err)
	}
	if err := b.tx.Commit(bookCtx); err != nil {
		return r.pgFailed(fmt.Errorf("commit batch: %w", err))
	}
	b.done = done
	r.m.StageDuration.WithLabelValues(metrics.StageMark).Observe(time.Since(confirmedAt).Seconds())
	r.m.BatchDuration.Observe(time.Since(b.claimed).Seconds())
	r.sendFailing.Store(linkDown != nil)
	if linkDown != nil {
		r.setLink(metrics.LinkAMQP, linkDown)
		return linkDown
	}
	r.setLink(metrics.LinkAMQP, nil)
	r.log.Debug("batch relayed", zap.Int("batch_size", b.size()), zap.Int("confirmed", len(done)), zap.Int("failed", len(failed)))
	return nil
}

// sameSeqs checks that the rows a settle marked by ctid are the ones it
// confirmed: the claim's locks keep every ctid on its row until the
// transaction ends, so a difference is a defect, and the settle must not
// commit.
func sameSeqs(marked, done []int64) error {
	if slices.Equal(slices.Sorted(slices.Values(marked)), slices.Sorted(slices.Values(done))) {
		return nil
	}
	return fmt.Errorf("marking by ctid found %d rows for the %d confirmed (seqs %v, want %v): not committed, the batch is retried", len(marked), len(done), head(marked), head(done))
}

// head is at most the first 10 of s, for an error message.
func head(s []int64) []int64 { return s[:min(len(s), 10)] }

// failure is a row that failed to publish, or that cannot be published.
type failure struct {
	msg Message
	err *PublishError
}

// Headers the relay adds to every message besides the row's own headers.
const (
	// HeaderSeq carries the row's sequence number (int64): consumers can check
	// per-key order with it.
	HeaderSeq = "x-outbox-seq"
	// HeaderPartitionKey carries the row's partition key, when it has one.
	HeaderPartitionKey = "x-outbox-partition-key"
)

// scanMessage reads a row of messageColumns into a message with the relay's
// headers added; undecodable headers give a *PublishError of reason invalid.
// extra receives the columns after messageColumns.
func scanMessage(rows pgx.Rows, extra ...any) (Message, error) {
	var (
		m       Message
		headers []byte
	)
	if err := rows.Scan(append([]any{&m.Seq, &m.ID, &m.Type, &m.Key, &m.Body, &m.ContentType, &headers,
		&m.CorrelationID, &m.CreatedAt, &m.Attempts, &m.RoutingKey, &m.Exchange}, extra...)...); err != nil {
		return m, fmt.Errorf("scan: %w", err)
	}
	for _, f := range []struct{ column, value string }{{"content_type", m.ContentType}, {"correlation_id", m.CorrelationID},
		{"routing_key", m.RoutingKey}, {"exchange", m.Exchange}} {
		if len(f.value) > maxShortString {
			return m, &PublishError{Reason: ReasonInvalid, Err: fmt.Errorf(
				"%s is %d bytes; AMQP allows at most %d", f.column, len(f.value), maxShortString)}
		}
	}
	h, err := DecodeHeaders(headers)
	if err != nil {
		return m, &PublishError{Reason: ReasonInvalid, Err: err}
	}
	if h == nil {
		h = make(map[string]any, 2)
	}
	h[HeaderSeq] = m.Seq
	if m.Key != "" {
		h[HeaderPartitionKey] = m.Key
	}
	m.Headers = h
	return m, nil
}

// record marks the confirmed rows (seqs done, found by their ctids tids)
// and schedules or parks the failed ones, one statement each.
func (r *Relay) record(ctx context.Context, tx pgx.Tx, done []int64, tids []pgtype.TID, failed []failure) error {
	if len(done) > 0 {
		q := r.q.markDispatched
		if r.cfg.Relay.OnDispatch == OnDispatchDelete {
			q = r.q.deleteDispatched
		}
		rows, err := tx.Query(ctx, q, tids)
		if err != nil {
			return fmt.Errorf("mark dispatched: %w", err)
		}
		marked, err := pgx.CollectRows(rows, pgx.RowTo[int64])
		if err != nil {
			return fmt.Errorf("mark dispatched: %w", err)
		}
		if err := sameSeqs(marked, done); err != nil {
			// Never committed: the batch's transaction rolls back and its
			// rows are claimed again.
			return fmt.Errorf("mark dispatched: %w", err)
		}
	}
	if len(failed) == 0 {
		return nil
	}
	var (
		seqs    = make([]int64, len(failed))
		errs    = make([]string, len(failed))
		delays  = make([]int64, len(failed))
		dead    = make([]bool, len(failed))
		charges = make([]int32, len(failed))
	)
	for i, f := range failed {
		attempt := f.msg.Attempts + 1
		seqs[i], errs[i], charges[i] = f.msg.Seq, f.err.Error(), 1
		dead[i] = f.err.Permanent() || attempt >= r.cfg.Relay.MaxAttempts
		if dead[i] {
			r.m.Dead.WithLabelValues(r.m.EventType(f.msg.Type), string(f.err.Reason)).Inc()
			r.log.Warn("event parked dead", zap.String("event_id", f.msg.ID.String()),
				zap.String("event_type", f.msg.Type), zap.Int("attempt", attempt), zap.Error(f.err))
			continue
		}
		delays[i] = backoff(attempt, r.cfg.Relay.RetryMinBackoff, r.cfg.Relay.RetryMaxBackoff).Milliseconds()
		r.m.Retries.WithLabelValues(r.m.EventType(f.msg.Type)).Inc()
		r.log.Debug("publish failed, will retry", zap.String("event_id", f.msg.ID.String()),
			zap.String("event_type", f.msg.Type), zap.Int("attempt", attempt),
			zap.Int64("retry_in_ms", delays[i]), zap.Error(f.err))
	}
	if _, err := tx.Exec(ctx, r.q.recordFailures, seqs, errs, delays, dead, charges); err != nil {
		return fmt.Errorf("record failures: %w", err)
	}
	return nil
}
