package rabbitmq

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"go.uber.org/zap"

	"github.com/outbox-relay/outbox-relay/relay"
)

// sent is a message's confirm, awaited until its batch's deadline.
type sent struct {
	dc       *amqp.DeferredConfirmation
	deadline time.Time
}

// slide waits until fewer than amqp.max_unconfirmed messages sent on the
// channel await their confirm: a batch goes out as the confirms of the
// messages before it come in, not all at once on top of them. The more
// messages await their confirm, the more each costs the broker
// (docs/benchmarks.md, "the broker's confirm window").
//
// A full window is refilled in steps of half of it (refillShare): slide
// waits until that many of its messages are confirmed, not just the
// oldest, so the next messages leave in one gathered write and Send wakes
// once per step instead of once per confirm (docs/benchmarks.md,
// "Refilling the window by halves"). It stops waiting for a message at
// its batch's deadline (that batch's Wait then resets the channel), and
// returns ctx's cause if ctx ends first: the rest of the batch is then not
// sent.
func (p *Publisher) slide(ctx context.Context) error {
	if ctx.Err() != nil {
		return context.Cause(ctx)
	}
	u := p.unconfirmed
	for len(u) > 0 && isDone(u[0].dc) {
		u = u[1:]
	}
	p.unconfirmed = u
	if len(u) < p.maxUnconfirmed {
		return nil
	}
	// The messages gathered so far go out first: their confirms may be the
	// ones awaited.
	p.release()
	defer p.wire.hold()
	for low := p.maxUnconfirmed - max(p.maxUnconfirmed/refillShare, 1); len(u) > low; {
		if isDone(u[0].dc) {
			u = u[1:]
			continue
		}
		t := time.NewTimer(time.Until(u[0].deadline))
		select {
		case <-u[0].dc.Done():
			u = u[1:]
		case <-ctx.Done():
			t.Stop()
			p.unconfirmed = u
			return context.Cause(ctx)
		case <-t.C:
			u = u[:0]
		}
		t.Stop()
	}
	p.unconfirmed = u
	return nil
}

// refillShare is the share of amqp.max_unconfirmed (1/refillShare, at
// least one message) whose confirms a full window waits for (slide).
// Halves did better than quarters in alternated drains (docs/benchmarks.md).
const refillShare = 2

// release writes the messages gathered on the wire (see wire). A failed
// write has closed the socket: the messages await their confirms in vain
// and fail with reason connection once amqp091-go's reader sees the close.
func (p *Publisher) release() {
	if err := p.wire.release(); err != nil {
		p.lastErr = fmt.Errorf("write to the broker: %w", err)
	}
}

// isDone reports whether dc's confirm (or the channel's close) arrived.
func isDone(dc *amqp.DeferredConfirmation) bool {
	select {
	case <-dc.Done():
		return true
	default:
		return false
	}
}

// Send implements relay.Publisher: it publishes every message, waiting only
// while amqp.max_unconfirmed messages sent before await their confirm
// (slide); Wait on the result collects the confirms and returns.
func (p *Publisher) Send(ctx context.Context, msgs []relay.Message) relay.Pending {
	p.mu.Lock()
	defer p.mu.Unlock()
	b := &amqpBatch{p: p, msgs: msgs, errs: make([]error, len(msgs)), sizes: make([]int, len(msgs))}
	if err := p.ensure(ctx); err != nil {
		fillAll(b.errs, &relay.PublishError{Reason: relay.ReasonConnection, Err: err})
		return b
	}
	b.c = p.cur
	p.wire.hold()
	defer p.release()
	if p.sentOn != b.c {
		p.unconfirmed, p.sentOn = p.unconfirmed[:0], b.c
	}
	b.confirms = make([]*amqp.DeferredConfirmation, len(msgs))
	b.byID = make(map[string]int, len(msgs))
	b.deadline = time.Now().Add(p.cfg.ConfirmTimeout)
	frameMax := p.conn.Config.FrameSize
	for i := range msgs {
		m := &msgs[i]
		exchange, key, err := p.route(m)
		if err != nil {
			b.errs[i] = err
			continue
		}
		pub, err := p.publishing(m)
		if err == nil {
			pub.AppId = cmp.Or(p.cfg.AppID, pub.AppId) // before the check: it counts toward the header frame
			err = p.check(pub, frameMax)
		}
		if err != nil {
			b.errs[i] = err
			continue
		}
		if err := p.slide(ctx); err != nil {
			// Not sent: ctx ended (an ordered batch's lease margin passed
			// while the window was full, or shutdown). Retried as it is.
			why := &relay.PublishError{Reason: relay.ReasonConnection, Err: fmt.Errorf("not sent: %w", err), Deferred: true}
			for j := i; j < len(msgs); j++ {
				if b.errs[j] == nil {
					b.errs[j] = why
				}
			}
			break
		}
		// slide has checked ctx: the WithContext variant does only that.
		b.sizes[i] = len(pub.Body) // before: a close this message causes may cut its publish off
		dc, err := b.c.ch.PublishWithDeferredConfirm(exchange, key, true, false, pub)
		if err != nil {
			// The channel is unusable. This message may have been cut off
			// part-written by a close it caused (a frame over frame_max), so
			// it is a suspect like those sent before it (Wait settles them);
			// the later ones were not sent. They fail with the broker's
			// reason if it closed the channel (a batch sent just before may
			// have closed it: 404 NOT_FOUND, say).
			b.errs[i] = &relay.PublishError{Reason: relay.ReasonConnection, Err: errChannelClosed}
			why := &relay.PublishError{Reason: relay.ReasonConnection, Err: err}
			if errors.Is(err, amqp.ErrClosed) {
				if closeErr := b.c.closeReason(); closeErr != nil {
					why.Err = fmt.Errorf("%w (the broker closed the channel: %d %s)", err, closeErr.Code, closeErr.Reason)
					// Closed over a message: these were not sent at all,
					// and the link is fine.
					why.Deferred = blamesMessage(closeErr)
				}
			}
			if !why.Deferred {
				p.lastErr = fmt.Errorf("publish: %w", why.Err)
			}
			for j := i + 1; j < len(msgs); j++ {
				if b.errs[j] == nil {
					b.errs[j] = why
				}
			}
			break
		}
		b.confirms[i] = dc
		p.unconfirmed = append(p.unconfirmed, sent{dc, b.deadline})
		b.byID[m.ID.String()] = i
	}
	return b
}

// check fails a message that can never be published, before it is sent:
// larger than the broker accepts, or a header frame over the negotiated
// frame_max (the broker would close the connection over it).
func (p *Publisher) check(pub amqp.Publishing, frameMax int) error {
	if len(pub.Body) > p.maxSize {
		source := "amqp.max_message_size"
		if p.maxSize < p.cfg.MaxMessageSize {
			source = "the broker's max_message_size, learned when it refused a larger message"
		}
		return &relay.PublishError{Reason: relay.ReasonTooLarge, Err: fmt.Errorf("message body is %d bytes, the broker accepts at most %d (%s)", len(pub.Body), p.maxSize, source)}
	}
	if p.skipChecks {
		return nil
	}
	if err := checkHeaders(pub.Headers); err != nil {
		return &relay.PublishError{Reason: relay.ReasonInvalid, Err: err}
	}
	if n := headerFrameSize(pub); frameMax > 0 && n > frameMax {
		return &relay.PublishError{Reason: relay.ReasonTooLarge, Err: fmt.Errorf(
			"headers and properties encode to a %d-byte header frame, over the broker's frame_max of %d bytes (shorten the headers or partition_key, or raise frame_max on the broker)", n, frameMax)}
	}
	return nil
}

// errChannelClosed fails a message whose channel the broker closed before
// confirming it.
var errChannelClosed = errors.New("channel closed before the confirm")

// amqpBatch is one sent batch awaiting its confirms.
type amqpBatch struct {
	p        *Publisher
	c        *amqpChannel
	msgs     []relay.Message
	errs     []error
	sizes    []int // body bytes of each message published or being published (a CloudEvents document is larger than its payload)
	confirms []*amqp.DeferredConfirmation
	byID     map[string]int
	deadline time.Time
}

// Wait collects the batch's confirms (until amqp.confirm_timeout after it
// was sent, or ctx) and its returns.
func (b *amqpBatch) Wait(ctx context.Context) []error {
	if b.c == nil {
		return b.errs
	}
	waitCtx, cancel := context.WithDeadline(ctx, b.deadline)
	defer cancel()
	timedOut := false
	for i, dc := range b.confirms {
		if dc == nil {
			continue
		}
		ack, err := waitConfirm(waitCtx, dc)
		switch {
		case err != nil:
			timedOut = true
			b.errs[i] = &relay.PublishError{Reason: relay.ReasonTimeout, Err: fmt.Errorf("no confirm within %s", b.p.cfg.ConfirmTimeout)}
		case !ack && b.c.ch.IsClosed():
			b.errs[i] = &relay.PublishError{Reason: relay.ReasonConnection, Err: errChannelClosed}
		case !ack:
			b.errs[i] = &relay.PublishError{Reason: relay.ReasonNack, Err: errors.New("broker nacked the message")}
		}
	}
	p := b.p
	p.mu.Lock()
	defer p.mu.Unlock()
	b.c.collectReturns()
	for id, i := range b.byID {
		if b.errs[i] == nil {
			b.errs[i] = b.c.takeReturn(id, p.cfg.Unroutable)
		}
	}
	if b.c.ch.IsClosed() {
		// The broker's reason (e.g. 404 NOT_FOUND, no such exchange) goes
		// into the error, and so into last_error and the logs.
		if closeErr := b.c.closeReason(); closeErr != nil {
			why := fmt.Errorf("%w: %d %s", errChannelClosed, closeErr.Code, closeErr.Reason)
			var cut []int // sent, and cut off by the close
			for i, err := range b.errs {
				if pe, ok := err.(*relay.PublishError); ok && pe.Err == errChannelClosed {
					b.errs[i] = &relay.PublishError{Reason: relay.ReasonConnection, Err: why}
					cut = append(cut, i)
				}
			}
			p.learnMaxSize(b.msgs, b.sizes, b.errs, closeErr)
			if blamesMessage(closeErr) {
				p.blame(ctx, b, cut, closeErr)
			}
		}
	}
	if (timedOut || b.c.ch.IsClosed()) && p.cur == b.c {
		// Late confirms and returns of this batch must not be mistaken for
		// later ones: start over on a fresh channel.
		p.lastErr = errors.New("channel reset after a lost or late confirm")
		if timedOut {
			p.closeLocked()
		} else {
			p.cur = nil
		}
	}
	return b.errs
}

// waitConfirm waits for dc until ctx is done; a confirm already received
// counts even when ctx is done too (select would pick either at random).
func waitConfirm(ctx context.Context, dc *amqp.DeferredConfirmation) (bool, error) {
	select {
	case <-dc.Done():
		return dc.Acked(), nil
	default:
	}
	return dc.WaitContext(ctx)
}

// collectReturns moves the returns received so far on c into c.returned.
// A return is dispatched before the confirm of its message, so once a
// batch's confirms are in, its returns are too.
func (c *amqpChannel) collectReturns() {
	for c.returns != nil {
		select {
		case r, ok := <-c.returns:
			if !ok {
				c.returns = nil
				return
			}
			c.returned[r.MessageId] = r
		default:
			return
		}
	}
}

// takeReturn removes and reports the return of message id, if it came.
func (c *amqpChannel) takeReturn(id, unroutable string) error {
	r, ok := c.returned[id]
	if !ok {
		return nil
	}
	delete(c.returned, id)
	return &relay.PublishError{Reason: relay.ReasonUnroutable, Accepted: unroutable == relay.UnroutableAccept, Err: fmt.Errorf(
		"returned by the broker: %d %s (no queue bound to exchange %q for routing key %q)", r.ReplyCode, r.ReplyText, r.Exchange, r.RoutingKey)}
}

// learnMaxSize handles a channel the broker closed because a message was
// larger than its max_message_size: the limit is learned from the close
// reason and the oversized messages fail permanently, so one poisoned event
// cannot fail its batch forever. The others stay connection failures. A
// message is measured by the body it was published with (sizes; a
// CloudEvents document is larger than its payload), or by its payload if
// it was not sent.
func (p *Publisher) learnMaxSize(msgs []relay.Message, sizes []int, errs []error, closeErr *amqp.Error) {
	if closeErr.Code != amqp.PreconditionFailed {
		return
	}
	match := tooLargeClose.FindStringSubmatch(closeErr.Reason)
	if match == nil {
		return
	}
	limit, err := strconv.Atoi(match[1])
	if err != nil || limit <= 0 {
		return
	}
	if limit < p.maxSize {
		p.log.Warn("the broker's max message size is below amqp.max_message_size; using the broker's",
			zap.Int("broker_max_message_size", limit), zap.Int("amqp_max_message_size", p.cfg.MaxMessageSize))
		p.maxSize = limit
	}
	for i, n := range sizes {
		if n == 0 {
			n = len(msgs[i].Body)
		}
		if n > limit {
			errs[i] = &relay.PublishError{Reason: relay.ReasonTooLarge, Err: fmt.Errorf("message body is %d bytes, the broker accepts at most %d: %s", n, limit, closeErr.Reason)}
		}
	}
}

// fillAll fails every message of a batch with err.
func fillAll(errs []error, err error) {
	for i := range errs {
		errs[i] = err
	}
}
