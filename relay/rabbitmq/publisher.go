// Package rabbitmq is the relay's AMQP 0-9-1 adapter: a relay.Publisher
// that publishes to RabbitMQ on one confirm-mode channel, mandatory and
// persistent, and turns confirms, nacks, returns and channel closes into
// one *relay.PublishError per message.
package rabbitmq

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"regexp"
	"sync"
	"sync/atomic"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"go.uber.org/zap"

	"github.com/outbox-relay/outbox-relay/metrics"
	"github.com/outbox-relay/outbox-relay/relay"
)

// Options are what a Publisher needs besides the amqp section of the config.
type Options struct {
	// Logger is required.
	Logger *zap.Logger
	// Window is the most messages one Send call carries (relay.batch_size).
	// Required.
	Window int
	// Batches is the most sent batches not yet waited for, as the caller
	// pipelines them (relay.Config.PendingBatches for a relay). Returns are
	// buffered for Batches*Window messages: a smaller buffer would stall
	// amqp091-go's reader. Required.
	Batches int
	// OnNode, if set, is told the index in amqp.url's list of each node
	// connected to (NodeGauge makes one that sets outbox_relay_amqp_node).
	OnNode func(i int)
}

// Publisher publishes to RabbitMQ on one confirm-mode channel, mandatory and
// persistent. It dials lazily and redials after the link drops; a batch in
// flight when the link drops fails with relay.ReasonConnection.
type Publisher struct {
	cfg  relay.AMQPConfig
	log  *zap.Logger
	urls []string // amqp.url, one per node
	// onNode, if set, is told the index in urls of each node connected to.
	onNode func(i int)
	// batches is Options.Batches: with a channel's window it sizes the
	// channel's returns buffer (see openChannel).
	batches int

	mu      sync.Mutex // serialises Publish and guards the fields below
	conn    *amqp.Connection
	sock    net.Conn     // conn's socket: closing it ends any wait on conn
	wire    *wire        // sock as conn writes to it
	cur     *amqpChannel // the channel batches are sent on; nil before the first dial
	lastErr error
	next    int // index in urls of the node to dial next
	node    int // index in urls of the node last connected to; -1 before
	window  int
	// unconfirmed are the messages sent on cur whose confirm has not
	// been seen, oldest first: Send keeps at most maxUnconfirmed of them.
	unconfirmed    []sent
	maxUnconfirmed int
	sentOn         *amqpChannel // the channel unconfirmed were sent on
	dials          atomic.Int64
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

// New returns a publisher for cfg, which must have had the relay's
// defaults applied (relay.Config.WithDefaults). It holds no connection until
// Connect or Send.
func New(cfg relay.AMQPConfig, opts Options) (*Publisher, error) {
	switch {
	case opts.Logger == nil:
		return nil, errors.New("rabbitmq: nil Logger")
	case opts.Window < 1:
		return nil, fmt.Errorf("rabbitmq: Window must be at least 1, got %d", opts.Window)
	case opts.Batches < 1:
		return nil, fmt.Errorf("rabbitmq: Batches must be at least 1, got %d", opts.Batches)
	}
	return &Publisher{cfg: cfg, log: opts.Logger, urls: cfg.URLs(), onNode: opts.OnNode, node: -1,
		window: opts.Window, batches: opts.Batches, maxSize: cfg.MaxMessageSize,
		maxUnconfirmed: cmp.Or(max(cfg.MaxUnconfirmed, 0), relay.DefaultMaxUnconfirmed),
		lastErr:        errors.New("not connected yet")}, nil
}

// Ready reports whether the channel is open.
func (p *Publisher) Ready() error {
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
func (p *Publisher) Dials() int64 { return p.dials.Load() }

// Connect dials now if not connected; Publish also does it on demand.
func (p *Publisher) Connect(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.ensure(ctx)
}

func (p *Publisher) ensure(ctx context.Context) error {
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
	var w *wire
	dialCfg := amqp.Config{
		Heartbeat:  10 * time.Second,
		Properties: amqp.Table{"connection_name": cmp.Or(p.cfg.ConnectionName, "outbox-relay")},
		Dial: func(network, addr string) (net.Conn, error) {
			c, err := dial(network, addr)
			if err != nil {
				return nil, err
			}
			sock, w = c, &wire{Conn: c, timeout: p.cfg.ConfirmTimeout}
			return w, nil
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
		p.lastErr = fmt.Errorf("dial %s: %s", relay.RedactURL(url), relay.Redact(err.Error()))
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
	p.conn, p.sock, p.wire, p.cur, p.lastErr = conn, sock, w, cur, nil
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
// the exchange. window is the most messages one batch sends on it.
func (p *Publisher) openChannel(conn *amqp.Connection, window int) (*amqpChannel, error) {
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
	c.returns = ch.NotifyReturn(make(chan amqp.Return, p.batches*window+16))
	c.closes = ch.NotifyClose(make(chan *amqp.Error, 1))
	return c, nil
}

// closeLocked drops the current link, if any. Batches still waiting keep
// their channel, and with it the returns received on it.
func (p *Publisher) closeLocked() {
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
	p.conn, p.sock, p.wire, p.cur = nil, nil, nil, nil
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
func (p *Publisher) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closeLocked()
	p.lastErr = errors.New("closed")
	return nil
}

// closeTimeout bounds a graceful connection.close.
const closeTimeout = 2 * time.Second

// NewForRelay returns the publisher a relay with cfg uses: Window
// relay.batch_size, Batches cfg.PendingBatches(), and with m, the
// outbox_relay_amqp_node gauge (NodeGauge). cfg gets its defaults and app
// names applied first, as relay.New does.
func NewForRelay(cfg relay.Config, log *zap.Logger, m *metrics.Metrics) (*Publisher, error) {
	cfg = cfg.WithDefaults().WithAppNames()
	opts := Options{Logger: log, Window: cfg.Relay.BatchSize, Batches: cfg.PendingBatches()}
	if m != nil {
		opts.OnNode = NodeGauge(m, cfg.AMQP.URLs())
	}
	return New(cfg.AMQP, opts)
}
