package rabbitmq

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/outbox-relay/outbox-relay/relay"
	"go.uber.org/zap"
)

// blamesMessage reports whether the broker closed the channel or the
// connection over a message it was sent (a header value it refuses, a frame
// over frame_max), rather than over the link or the broker itself (320
// CONNECTION_FORCED at a restart, 403 or 404 for every message alike, a
// network error, which amqp091-go reports with Server false).
func blamesMessage(e *amqp.Error) bool {
	if e == nil || !e.Server {
		return false
	}
	switch e.Code {
	case amqp.PreconditionFailed, amqp.FrameError, amqp.SyntaxError, amqp.CommandInvalid, amqp.UnexpectedFrame:
		return true
	}
	return false
}

// culpritError is the failure of a message shown to close the channel or
// the connection when sent alone: retrying cannot help.
func culpritError(e *amqp.Error) *relay.PublishError {
	reason := relay.ReasonInvalid
	if strings.Contains(e.Reason, "frame_too_large") || tooLargeClose.MatchString(e.Reason) {
		reason = relay.ReasonTooLarge
	}
	return &relay.PublishError{Reason: reason, Err: fmt.Errorf("the broker closed the link over this message, sent alone: %d %s", e.Code, e.Reason)}
}

// blame handles a close that a message of the channel caused: among the
// messages of b it cut off, the one that caused it is found by sending them
// again one at a time, and fails for good; the others are retried without
// charge and without taking the link down. Once a channel's culprit is
// known, later batches of that channel need no search.
func (p *Publisher) blame(ctx context.Context, b *amqpBatch, cut []int, closeErr *amqp.Error) {
	var suspects []int
	for _, i := range cut {
		if pe, ok := b.errs[i].(*relay.PublishError); ok && pe.Reason == relay.ReasonConnection {
			suspects = append(suspects, i)
		} else {
			b.c.blamed = true // learnMaxSize named it
		}
	}
	if !b.c.blamed && len(suspects) > 0 {
		p.log.Info("the broker closed the link over a message; sending the unconfirmed ones alone to find it",
			zap.Int("suspects", len(suspects)), zap.Int("code", closeErr.Code), zap.String("reason", closeErr.Reason))
		suspects = p.isolate(ctx, b, suspects)
	}
	for _, i := range suspects {
		if pe, ok := b.errs[i].(*relay.PublishError); ok && pe.Reason == relay.ReasonConnection {
			pe.Deferred = true
		}
	}
}

// isolate publishes the suspects of b one at a time, each awaiting its
// confirm, on a channel of their own; it stops at the first that makes the
// broker close the channel again, which fails with culpritError, and
// returns the suspects it did not settle. Confirmed suspects succeed (a
// duplicate at most, if the first copy was routed too).
func (p *Publisher) isolate(ctx context.Context, b *amqpBatch, suspects []int) (rest []int) {
	var c *amqpChannel
	defer func() {
		if c != nil && !c.ch.IsClosed() {
			// Bounded like closeLocked: a broker that began blocking
			// publishers meanwhile never answers channel.close.
			sock := p.sock
			drop := time.AfterFunc(closeTimeout, func() {
				if sock != nil {
					_ = sock.Close()
				}
			})
			_ = c.ch.Close()
			drop.Stop()
		}
	}()
	for k, i := range suspects {
		if c == nil || c.ch.IsClosed() {
			if err := p.ensure(ctx); err != nil {
				return suspects[k:]
			}
			var err error
			if c, err = p.openChannel(p.conn, 1); err != nil {
				return suspects[k:]
			}
		}
		m := &b.msgs[i]
		exchange, key, err := p.route(m)
		if err != nil {
			return suspects[k:] // it was routed when first sent
		}
		pub, err := p.publishing(m)
		if err != nil {
			return suspects[k:]
		}
		dc, err := c.ch.PublishWithDeferredConfirmWithContext(ctx, exchange, key, true, false, pub)
		if err != nil {
			// Alone on the link, a message that makes the broker close it
			// can be cut off while it is being written.
			if errors.Is(err, amqp.ErrClosed) {
				if why := c.closeReason(); blamesMessage(why) {
					b.errs[i] = culpritError(why)
					b.c.blamed = true
					return suspects[k+1:]
				}
			}
			return suspects[k:]
		}
		waitCtx, cancel := context.WithTimeout(ctx, p.cfg.ConfirmTimeout)
		ack, err := waitConfirm(waitCtx, dc)
		cancel()
		switch {
		case err != nil:
			return suspects[k:]
		case ack:
			c.collectReturns()
			b.errs[i] = c.takeReturn(m.ID.String(), p.cfg.Unroutable)
		case !c.ch.IsClosed():
			b.errs[i] = &relay.PublishError{Reason: relay.ReasonNack, Err: fmt.Errorf("broker nacked the message")}
		default:
			why := c.closeReason()
			if !blamesMessage(why) {
				return suspects[k:] // the link failed meanwhile: nobody's fault
			}
			b.errs[i] = culpritError(why)
			b.c.blamed = true
			return suspects[k+1:]
		}
	}
	return nil
}
