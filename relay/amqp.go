package relay

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"sync"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"go.uber.org/zap"
)

// AMQPPublisher publishes to RabbitMQ on one confirm-mode channel, mandatory
// and persistent. It dials lazily and redials after the link drops; a batch in
// flight when the link drops fails with ReasonConnection.
type AMQPPublisher struct {
	cfg AMQPConfig
	log *zap.Logger

	mu      sync.Mutex // serialises Publish and guards the fields below
	conn    *amqp.Connection
	ch      *amqp.Channel
	returns chan amqp.Return
	closes  chan *amqp.Error
	lastErr error
	window  int
	// maxSize is amqp.max_message_size, lowered to what the broker reports
	// if it closes the channel over a message that was too large for it.
	maxSize int
}

// tooLargeClose matches RabbitMQ's channel error for an oversized message:
// "PRECONDITION_FAILED - message size 2097152 is larger than configured max size 1048576".
var tooLargeClose = regexp.MustCompile(`larger than configured max size (\d+)`)

// NewAMQPPublisher returns a publisher for cfg (defaults applied). window is
// the most messages one Publish call sends; it sizes the return buffer.
func NewAMQPPublisher(cfg AMQPConfig, window int, log *zap.Logger) *AMQPPublisher {
	return &AMQPPublisher{cfg: cfg, log: log, window: window, maxSize: cfg.MaxMessageSize, lastErr: errors.New("not connected yet")}
}

// Ready reports whether the channel is open.
func (p *AMQPPublisher) Ready() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ch != nil && !p.ch.IsClosed() {
		return nil
	}
	return p.lastErr
}

// Connect dials now if not connected; Publish also does it on demand.
func (p *AMQPPublisher) Connect(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.ensure(ctx)
}

func (p *AMQPPublisher) ensure(ctx context.Context) error {
	if p.ch != nil && !p.ch.IsClosed() {
		return nil
	}
	p.closeLocked()
	dialCfg := amqp.Config{
		Heartbeat:  10 * time.Second,
		Properties: amqp.Table{"connection_name": "outbox-relay"},
		Dial:       amqp.DefaultDial(10 * time.Second),
	}
	if dl, ok := ctx.Deadline(); ok {
		dialCfg.Dial = amqp.DefaultDial(time.Until(dl))
	}
	conn, err := amqp.DialConfig(p.cfg.URL, dialCfg)
	if err != nil {
		p.lastErr = fmt.Errorf("dial %s: %s", RedactURL(p.cfg.URL), Redact(err.Error()))
		return p.lastErr
	}
	ch, err := conn.Channel()
	if err != nil {
		conn.Close()
		p.lastErr = fmt.Errorf("open channel: %w", err)
		return p.lastErr
	}
	if err := ch.Confirm(false); err != nil {
		conn.Close()
		p.lastErr = fmt.Errorf("enable publisher confirms: %w", err)
		return p.lastErr
	}
	if *p.cfg.DeclareExchange {
		if err := ch.ExchangeDeclare(p.cfg.Exchange, p.cfg.ExchangeType, true, false, false, false, nil); err != nil {
			conn.Close()
			p.lastErr = fmt.Errorf("declare exchange %q (set amqp.declare_exchange: false if it is managed elsewhere): %w", p.cfg.Exchange, err)
			return p.lastErr
		}
	}
	// basic.return is dispatched synchronously before the confirm of the same
	// message, so a buffer as large as one batch means a return is always
	// in the buffer by the time its ack is seen.
	p.returns = ch.NotifyReturn(make(chan amqp.Return, 2*p.window+16))
	p.closes = ch.NotifyClose(make(chan *amqp.Error, 1))
	p.conn, p.ch, p.lastErr = conn, ch, nil
	return nil
}

// closeLocked drops the current link, if any.
func (p *AMQPPublisher) closeLocked() {
	if p.conn != nil {
		_ = p.conn.Close()
	}
	p.conn, p.ch, p.returns, p.closes = nil, nil, nil, nil
}

// Close closes the connection. It is safe to call more than once.
func (p *AMQPPublisher) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closeLocked()
	p.lastErr = errors.New("closed")
	return nil
}

// Publish implements Publisher: every message is published before any
// confirm is awaited, then the confirms and returns are matched up.
func (p *AMQPPublisher) Publish(ctx context.Context, msgs []Message) []error {
	p.mu.Lock()
	defer p.mu.Unlock()
	errs := make([]error, len(msgs))
	if err := p.ensure(ctx); err != nil {
		fillAll(errs, &PublishError{Reason: ReasonConnection, Err: err})
		return errs
	}
	ch := p.ch
	confirms := make([]*amqp.DeferredConfirmation, len(msgs))
	byID := make(map[string]int, len(msgs))
	for i := range msgs {
		m := &msgs[i]
		if len(m.Body) > p.maxSize {
			errs[i] = &PublishError{Reason: ReasonTooLarge, Err: fmt.Errorf("payload is %d bytes, the broker accepts at most %d (amqp.max_message_size)", len(m.Body), p.maxSize)}
			continue
		}
		dc, err := ch.PublishWithDeferredConfirmWithContext(ctx, p.cfg.Exchange, m.Type, true, false, toPublishing(m))
		if err != nil {
			// The channel is unusable: fail this message and every later one.
			p.lastErr = fmt.Errorf("publish: %w", err)
			for j := i; j < len(msgs); j++ {
				if errs[j] == nil {
					errs[j] = &PublishError{Reason: ReasonConnection, Err: err}
				}
			}
			break
		}
		confirms[i] = dc
		byID[m.ID.String()] = i
	}

	waitCtx, cancel := context.WithTimeout(ctx, p.cfg.ConfirmTimeout)
	defer cancel()
	timedOut := false
	for i, dc := range confirms {
		if dc == nil {
			continue
		}
		ack, err := dc.WaitContext(waitCtx)
		switch {
		case err != nil:
			timedOut = true
			errs[i] = &PublishError{Reason: ReasonTimeout, Err: fmt.Errorf("no confirm within %s", p.cfg.ConfirmTimeout)}
		case !ack && ch.IsClosed():
			errs[i] = &PublishError{Reason: ReasonConnection, Err: errors.New("channel closed before the confirm")}
		case !ack:
			errs[i] = &PublishError{Reason: ReasonNack, Err: errors.New("broker nacked the message")}
		}
	}
	p.drainReturns(byID, errs)
	if ch.IsClosed() {
		p.learnMaxSize(msgs, errs)
	}
	if timedOut || ch.IsClosed() {
		// Late confirms and returns of this batch must not be mistaken for
		// the next one's: start over on a fresh channel.
		p.lastErr = errors.New("channel reset after a lost or late confirm")
		p.closeLocked()
	}
	return errs
}

// learnMaxSize handles a channel the broker closed because a message was
// larger than its max_message_size: the limit is learned from the close
// reason and the oversized messages fail permanently, so one poisoned event
// cannot fail its batch forever. The others stay connection failures.
func (p *AMQPPublisher) learnMaxSize(msgs []Message, errs []error) {
	var closeErr *amqp.Error
	select {
	case closeErr = <-p.closes:
	default:
	}
	if closeErr == nil || closeErr.Code != amqp.PreconditionFailed {
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
	for i := range msgs {
		if len(msgs[i].Body) > limit {
			errs[i] = &PublishError{Reason: ReasonTooLarge, Err: fmt.Errorf("payload is %d bytes, the broker accepts at most %d: %s", len(msgs[i].Body), limit, closeErr.Reason)}
		}
	}
}

func (p *AMQPPublisher) drainReturns(byID map[string]int, errs []error) {
	for {
		select {
		case r, ok := <-p.returns:
			if !ok {
				return
			}
			i, mine := byID[r.MessageId]
			if !mine || errs[i] != nil {
				continue
			}
			errs[i] = &PublishError{Reason: ReasonUnroutable, Accepted: p.cfg.Unroutable == UnroutableAccept, Err: fmt.Errorf("returned by the broker: %d %s (no queue bound to exchange %q for routing key %q)", r.ReplyCode, r.ReplyText, r.Exchange, r.RoutingKey)}
		default:
			return
		}
	}
}

func toPublishing(m *Message) amqp.Publishing {
	return amqp.Publishing{
		Headers:       amqp.Table(m.Headers),
		ContentType:   m.ContentType,
		DeliveryMode:  amqp.Persistent,
		CorrelationId: m.CorrelationID,
		MessageId:     m.ID.String(),
		Timestamp:     m.CreatedAt,
		Type:          m.Type,
		AppId:         "outbox-relay",
		Body:          m.Body,
	}
}

func fillAll(errs []error, err error) {
	for i := range errs {
		errs[i] = err
	}
}
