package relay

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"regexp"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"go.uber.org/zap"
)

// AMQPPublisher publishes to RabbitMQ on one confirm-mode channel, mandatory
// and persistent. It dials lazily and redials after the link drops; a batch in
// flight when the link drops fails with ReasonConnection.
type AMQPPublisher struct {
	cfg  AMQPConfig
	log  *zap.Logger
	urls []string // amqp.url, one per node
	// onNode, if set, is told the index in urls of each node connected to.
	onNode func(i int)

	mu      sync.Mutex // serialises Publish and guards the fields below
	conn    *amqp.Connection
	sock    net.Conn     // conn's socket: closing it ends any wait on conn
	cur     *amqpChannel // the channel batches are sent on; nil before the first dial
	lastErr error
	next    int // index in urls of the node to dial next
	node    int // index in urls of the node last connected to; -1 before
	window  int
	dials   atomic.Int64
	// skipChecks turns the checks before publishing off, so that tests can
	// prove that a close the checks did not foresee still blames the message.
	skipChecks bool
	// maxSize is amqp.max_message_size, lowered to what the broker reports
	// if it closes the channel over a message that was too large for it.
	maxSize int
}

// tooLargeClose matches RabbitMQ's channel error for an oversized message:
// "PRECONDITION_FAILED - message size 2097152 is larger than configured max size 1048576".
var tooLargeClose = regexp.MustCompile(`larger than configured max size (\d+)`)

// NewAMQPPublisher returns a publisher for cfg (defaults applied). window is
// the most messages one Send call sends; up to five batches may be in flight
// (Relay.inflightLimit + 1), and the return buffer is sized for them.
func NewAMQPPublisher(cfg AMQPConfig, window int, log *zap.Logger) *AMQPPublisher {
	return &AMQPPublisher{cfg: cfg, log: log, urls: cfg.URLs(), node: -1, window: window, maxSize: cfg.MaxMessageSize,
		lastErr: errors.New("not connected yet")}
}

// Ready reports whether the channel is open.
func (p *AMQPPublisher) Ready() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cur != nil && !p.cur.ch.IsClosed() {
		return nil
	}
	if p.lastErr == nil {
		// Closed by the broker or the network since it was opened.
		return errors.New("channel closed")
	}
	return p.lastErr
}

// Dials returns how many connections the publisher has opened.
func (p *AMQPPublisher) Dials() int64 { return p.dials.Load() }

// Connect dials now if not connected; Publish also does it on demand.
func (p *AMQPPublisher) Connect(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.ensure(ctx)
}

func (p *AMQPPublisher) ensure(ctx context.Context) error {
	if p.cur != nil && !p.cur.ch.IsClosed() {
		return nil
	}
	if p.conn != nil && !p.conn.IsClosed() {
		// The broker closed the channel, not the connection (a message it
		// refused, say): a new channel on the same connection will do.
		cur, err := p.openChannel(p.conn, p.window)
		if err == nil {
			p.cur, p.lastErr = cur, nil
			return nil
		}
	}
	p.closeLocked()
	dial := amqp.DefaultDial(10 * time.Second)
	if dl, ok := ctx.Deadline(); ok {
		dial = amqp.DefaultDial(time.Until(dl))
	}
	var sock net.Conn
	dialCfg := amqp.Config{
		Heartbeat:  10 * time.Second,
		Properties: amqp.Table{"connection_name": cmp.Or(p.cfg.ConnectionName, "outbox-relay")},
		Dial: func(network, addr string) (net.Conn, error) {
			c, err := dial(network, addr)
			if err != nil {
				return nil, err
			}
			sock = c
			return writeDeadlineConn{Conn: c, timeout: p.cfg.ConfirmTimeout}, nil
		},
	}
	// One node per attempt: the caller's backoff between attempts applies
	// as it does with a single node, and a node that fails to answer hands
	// over to the next one.
	i := p.next % len(p.urls)
	url := p.urls[i]
	conn, err := amqp.DialConfig(url, dialCfg)
	if err != nil {
		p.next = i + 1
		p.lastErr = fmt.Errorf("dial %s: %s", RedactURL(url), Redact(err.Error()))
		if len(p.urls) > 1 {
			p.lastErr = fmt.Errorf("%w (node %d of %d; the next attempt tries %s)", p.lastErr, i+1, len(p.urls), nodeName(p.urls[p.next%len(p.urls)]))
		}
		return p.lastErr
	}
	cur, err := p.openChannel(conn, p.window)
	if err != nil {
		conn.Close()
		p.lastErr = err
		return p.lastErr
	}
	p.dials.Add(1)
	p.conn, p.sock, p.cur, p.lastErr = conn, sock, cur, nil
	if i != p.node {
		p.log.Info("connected to broker node", zap.String("node", nodeName(url)), zap.Int("node_index", i+1), zap.Int("nodes", len(p.urls)))
		p.node = i
		if p.onNode != nil {
			p.onNode(i)
		}
	}
	return nil
}

// amqpChannel is one confirm-mode channel with what was received on it.
// Returns are matched by message id within their channel only: a retry of
// the same message on a later channel never meets an old return.
type amqpChannel struct {
	ch       *amqp.Channel
	returns  chan amqp.Return
	returned map[string]amqp.Return // received, not yet matched to a batch
	closes   chan *amqp.Error
	closedBy *amqp.Error // the broker's reason for closing ch, once read from closes
	// blamed is set once a message sent on ch was shown to have closed it:
	// the other messages it cut off are innocent of that close.
	blamed bool
}

// openChannel opens a confirm-mode channel on conn, declaring or checking
// the exchange. window is how many messages may be in flight on it.
func (p *AMQPPublisher) openChannel(conn *amqp.Connection, window int) (*amqpChannel, error) {
	ch, err := conn.Channel()
	if err != nil {
		return nil, fmt.Errorf("open channel: %w", err)
	}
	if err := ch.Confirm(false); err != nil {
		ch.Close()
		return nil, fmt.Errorf("enable publisher confirms: %w", err)
	}
	if *p.cfg.DeclareExchange {
		if err := ch.ExchangeDeclare(p.cfg.Exchange, p.cfg.ExchangeType, true, false, false, false, nil); err != nil {
			ch.Close()
			return nil, fmt.Errorf("declare exchange %q (set amqp.declare_exchange: false if it is managed elsewhere): %w", p.cfg.Exchange, err)
		}
	} else if err := ch.ExchangeDeclarePassive(p.cfg.Exchange, p.cfg.ExchangeType, true, false, false, false, nil); err != nil {
		// Checked, not declared: without the exchange every publish would
		// close the channel, and the link would flap at every batch.
		return nil, fmt.Errorf("exchange %q not found (amqp.declare_exchange is false: declare it on the broker, or check the name): %w", p.cfg.Exchange, err)
	}
	if err := p.declareRouted(ch); err != nil {
		_ = ch.Close()
		return nil, err
	}
	// basic.return is dispatched synchronously before the confirm of the same
	// message, so a buffer larger than the batches in flight means a return
	// is always in the buffer by the time its ack is seen.
	c := &amqpChannel{ch: ch, returned: map[string]amqp.Return{}}
	c.returns = ch.NotifyReturn(make(chan amqp.Return, 5*window+16))
	c.closes = ch.NotifyClose(make(chan *amqp.Error, 1))
	return c, nil
}

// closeLocked drops the current link, if any. Batches still waiting keep
// their channel, and with it the returns received on it.
func (p *AMQPPublisher) closeLocked() {
	if p.conn != nil {
		// A broker that stopped reading (a memory or disk alarm blocks
		// publishers) never answers connection.close: give it a moment, then
		// drop the socket, which ends the wait. CloseDeadline would not do:
		// amqp091-go's heartbeater pushes the read deadline out at every
		// frame received, and a blocked broker still sends heartbeats.
		sock := p.sock
		drop := time.AfterFunc(closeTimeout, func() { _ = sock.Close() })
		_ = p.conn.Close()
		drop.Stop()
	}
	p.conn, p.sock, p.cur = nil, nil, nil
}

// closeReasonWait bounds the wait for the reason of a channel already seen
// closed: amqp091-go marks the channel closed just before it delivers the
// reason, or closes the notification channel when there is none.
const closeReasonWait = time.Second

// closeReason returns the broker's reason for closing the channel, which
// must already be closed, or nil when it gave none.
func (c *amqpChannel) closeReason() *amqp.Error {
	if c.closedBy != nil || c.closes == nil {
		return c.closedBy
	}
	t := time.NewTimer(closeReasonWait)
	defer t.Stop()
	select {
	case e, ok := <-c.closes:
		if ok {
			c.closedBy = e
		} else {
			c.closes = nil
		}
	case <-t.C:
	}
	return c.closedBy
}

// Close closes the connection. It is safe to call more than once.
func (p *AMQPPublisher) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closeLocked()
	p.lastErr = errors.New("closed")
	return nil
}

// Send implements Publisher: it publishes every message without waiting;
// Wait on the result collects the confirms and returns.
func (p *AMQPPublisher) Send(ctx context.Context, msgs []Message) Pending {
	p.mu.Lock()
	defer p.mu.Unlock()
	b := &amqpBatch{p: p, msgs: msgs, errs: make([]error, len(msgs))}
	if err := p.ensure(ctx); err != nil {
		fillAll(b.errs, &PublishError{Reason: ReasonConnection, Err: err})
		return b
	}
	b.c = p.cur
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
		dc, err := b.c.ch.PublishWithDeferredConfirmWithContext(ctx, exchange, key, true, false, pub)
		if err != nil {
			// The channel is unusable: fail this message and every later one,
			// with the broker's reason if it closed the channel (a batch
			// sent just before may have closed it: 404 NOT_FOUND, say).
			why := &PublishError{Reason: ReasonConnection, Err: err}
			if errors.Is(err, amqp.ErrClosed) && b.c.ch.IsClosed() {
				if closeErr := b.c.closeReason(); closeErr != nil {
					why.Err = fmt.Errorf("%w (the broker closed the channel: %d %s)", err, closeErr.Code, closeErr.Reason)
					// Closed over a message sent before: these were not
					// sent at all, and the link is fine.
					why.Deferred = blamesMessage(closeErr)
				}
			}
			if !why.Deferred {
				p.lastErr = fmt.Errorf("publish: %w", why.Err)
			}
			for j := i; j < len(msgs); j++ {
				if b.errs[j] == nil {
					b.errs[j] = why
				}
			}
			break
		}
		b.confirms[i] = dc
		b.byID[m.ID.String()] = i
	}
	return b
}

// check fails a message that can never be published, before it is sent:
// larger than the broker accepts, or a header frame over the negotiated
// frame_max (the broker would close the connection over it).
func (p *AMQPPublisher) check(pub amqp.Publishing, frameMax int) error {
	if len(pub.Body) > p.maxSize {
		source := "amqp.max_message_size"
		if p.maxSize < p.cfg.MaxMessageSize {
			source = "the broker's max_message_size, learned when it refused a larger message"
		}
		return &PublishError{Reason: ReasonTooLarge, Err: fmt.Errorf("message body is %d bytes, the broker accepts at most %d (%s)", len(pub.Body), p.maxSize, source)}
	}
	if p.skipChecks {
		return nil
	}
	if err := checkHeaders(pub.Headers); err != nil {
		return &PublishError{Reason: ReasonInvalid, Err: err}
	}
	if n := headerFrameSize(pub); frameMax > 0 && n > frameMax {
		return &PublishError{Reason: ReasonTooLarge, Err: fmt.Errorf(
			"headers and properties encode to a %d-byte header frame, over the broker's frame_max of %d bytes (shorten the headers or partition_key, or raise frame_max on the broker)", n, frameMax)}
	}
	return nil
}

// errChannelClosed fails a message whose channel the broker closed before
// confirming it.
var errChannelClosed = errors.New("channel closed before the confirm")

// amqpBatch is one sent batch awaiting its confirms.
type amqpBatch struct {
	p        *AMQPPublisher
	c        *amqpChannel
	msgs     []Message
	errs     []error
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
			b.errs[i] = &PublishError{Reason: ReasonTimeout, Err: fmt.Errorf("no confirm within %s", b.p.cfg.ConfirmTimeout)}
		case !ack && b.c.ch.IsClosed():
			b.errs[i] = &PublishError{Reason: ReasonConnection, Err: errChannelClosed}
		case !ack:
			b.errs[i] = &PublishError{Reason: ReasonNack, Err: errors.New("broker nacked the message")}
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
				if pe, ok := err.(*PublishError); ok && pe.Err == errChannelClosed {
					b.errs[i] = &PublishError{Reason: ReasonConnection, Err: why}
					cut = append(cut, i)
				}
			}
			p.learnMaxSize(b.msgs, b.errs, closeErr)
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
	return &PublishError{Reason: ReasonUnroutable, Accepted: unroutable == UnroutableAccept, Err: fmt.Errorf(
		"returned by the broker: %d %s (no queue bound to exchange %q for routing key %q)", r.ReplyCode, r.ReplyText, r.Exchange, r.RoutingKey)}
}

// learnMaxSize handles a channel the broker closed because a message was
// larger than its max_message_size: the limit is learned from the close
// reason and the oversized messages fail permanently, so one poisoned event
// cannot fail its batch forever. The others stay connection failures.
func (p *AMQPPublisher) learnMaxSize(msgs []Message, errs []error, closeErr *amqp.Error) {
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
	for i := range msgs {
		if len(msgs[i].Body) > limit {
			errs[i] = &PublishError{Reason: ReasonTooLarge, Err: fmt.Errorf("payload is %d bytes, the broker accepts at most %d: %s", len(msgs[i].Body), limit, closeErr.Reason)}
		}
	}
}

// writeDeadlineConn fails a write to the broker that takes longer than
// timeout. A broker blocked by a memory or disk alarm stops reading; once
// the socket buffers are full, an unbounded write would hold the
// publisher's lock for as long as the alarm lasts, hanging settling and
// shutdown. A failed write closes the connection, so the batch fails with
// reason connection and is retried.
type writeDeadlineConn struct {
	net.Conn
	timeout time.Duration
}

func (c writeDeadlineConn) Write(b []byte) (int, error) {
	if err := c.Conn.SetWriteDeadline(time.Now().Add(c.timeout)); err != nil {
		return 0, err
	}
	return c.Conn.Write(b)
}

// closeTimeout bounds a graceful connection.close.
const closeTimeout = 2 * time.Second

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
