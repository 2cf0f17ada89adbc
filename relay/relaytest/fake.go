// Package relaytest holds what tests of the relay and of its publishers
// share: Fake, a relay.Publisher whose outcomes a test scripts, so that an
// engine test can make a case deterministic that a real broker cannot
// (a nack for exactly one message, a link lost mid-batch); TestPublisher, the
// conformance suite every implementation, the fake included, must pass; and
// Proxy, a TCP proxy that lets the suite stall or cut a real broker link.
package relaytest

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/google/uuid"

	"github.com/outbox-relay/outbox-relay/relay"
)

// Outcome is what the fake broker does with one message.
type Outcome int

// The outcomes a test can script. Each fails the message with the reason a
// real broker's equivalent gives, so the engine cannot tell them apart.
const (
	// Confirm acknowledges the message (the default).
	Confirm Outcome = iota
	// Nack refuses it: relay.ReasonNack.
	Nack
	// Unroutable confirms and returns it: relay.ReasonUnroutable.
	Unroutable
	// Timeout never confirms it: Wait fails it with relay.ReasonTimeout
	// after ConfirmTimeout (or when its ctx ends), and the link is reset.
	Timeout
	// ConnectionLoss drops the link while the message is sent: it and the
	// rest of its batch fail with relay.ReasonConnection.
	ConnectionLoss
)

// Fake is a relay.Publisher backed by a scripted broker. The zero value
// is not usable: create it with NewFake. It is safe for concurrent use.
type Fake struct {
	// ConfirmTimeout bounds Wait for messages without a confirm, as
	// amqp.confirm_timeout does. Set it before the first Send.
	ConfirmTimeout time.Duration
	// AcceptUnroutable marks unroutable failures Accepted, as
	// amqp.unroutable: accept does.
	AcceptUnroutable bool
	// Route reports whether a message reaches a queue; an unrouted one is
	// confirmed and returned. Nil routes every message.
	Route func(m relay.Message) bool

	mu       sync.Mutex
	script   map[uuid.UUID][]Outcome
	link     error         // nil: up
	refuse   error         // connecting fails with it while set
	dropped  chan struct{} // closed when the current link drops
	stall                  // Stall and Resume
	sent     []relay.Message
	connects int
}

var (
	errNotConnected = errors.New("not connected yet")
	errClosed       = errors.New("closed")
	errLinkLost     = errors.New("channel closed before the confirm")
	errReset        = errors.New("channel reset after a lost or late confirm")
)

// NewFake returns a fake that confirms every message, with a one-second
// confirm timeout.
func NewFake() *Fake {
	return &Fake{ConfirmTimeout: time.Second, script: map[uuid.UUID][]Outcome{}, link: errNotConnected}
}

// Script sets the outcomes of the next sends of message id, one per send;
// later sends get the default (Route decides).
func (f *Fake) Script(id uuid.UUID, outcomes ...Outcome) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.script[id] = append(f.script[id], outcomes...)
}

// Stall makes the broker stop answering: batches sent from now on get no
// confirm until Resume (or their confirm timeout).
func (f *Fake) Stall() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.hold()
}

// Resume ends a Stall: held confirms arrive.
func (f *Fake) Resume() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.release()
}

// Cut drops the link as a network failure would: messages not yet
// confirmed fail with relay.ReasonConnection. The next Connect or Send
// connects again (unless Refuse says otherwise).
func (f *Fake) Cut() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.dropLocked(errors.New("connection lost"))
}

// Refuse makes connecting fail with err (a broker down); nil lets
// connections through again.
func (f *Fake) Refuse(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.refuse = err
	if err != nil {
		f.dropLocked(err)
	}
}

// Sent returns every message sent so far, in order, retries included.
func (f *Fake) Sent() []relay.Message {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.sent)
}

// Connects returns how many times the link was established.
func (f *Fake) Connects() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.connects
}

// Ready implements relay.Publisher.
func (f *Fake) Ready() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.link
}

// Connect implements relay.Publisher.
func (f *Fake) Connect(ctx context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.connectLocked()
}

// Close implements relay.Publisher; it is safe to call more than once.
func (f *Fake) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.dropLocked(errClosed)
	return nil
}

func (f *Fake) connectLocked() error {
	if f.refuse != nil {
		f.link = f.refuse
		return f.link
	}
	if f.link != nil {
		f.link, f.dropped = nil, make(chan struct{})
		f.connects++
	}
	return nil
}

// dropLocked takes the link down with why; batches waiting on it end.
func (f *Fake) dropLocked(why error) {
	if f.dropped != nil {
		close(f.dropped)
		f.dropped = nil
	}
	f.link = why
}

// next pops the scripted outcome of m, or decides it by Route.
func (f *Fake) next(m relay.Message) Outcome {
	if s := f.script[m.ID]; len(s) > 0 {
		f.script[m.ID] = s[1:]
		return s[0]
	}
	if f.Route != nil && !f.Route(m) {
		return Unroutable
	}
	return Confirm
}

// Send implements relay.Publisher. Like the AMQP publisher it connects on
// demand.
func (f *Fake) Send(ctx context.Context, msgs []relay.Message) relay.Pending {
	f.mu.Lock()
	defer f.mu.Unlock()
	b := &fakeBatch{f: f, errs: make([]error, len(msgs)), open: make([]Outcome, len(msgs)),
		deadline: time.Now().Add(f.ConfirmTimeout)}
	if err := f.connectLocked(); err != nil {
		for i := range b.errs {
			b.errs[i] = &relay.PublishError{Reason: relay.ReasonConnection, Err: err}
		}
		return b
	}
	b.dropped, b.resumed = f.dropped, f.resumed
	for i, m := range msgs {
		f.sent = append(f.sent, m)
		o := f.next(m)
		if o == ConnectionLoss {
			f.dropLocked(errors.New("connection lost while publishing"))
			for j := i; j < len(msgs); j++ {
				b.errs[j] = &relay.PublishError{Reason: relay.ReasonConnection, Err: errLinkLost}
				b.open[j] = settled
			}
			break
		}
		b.open[i] = o
	}
	return b
}

// fakeBatch is a batch the fake has sent.
type fakeBatch struct {
	f        *Fake
	errs     []error
	open     []Outcome // each message's outcome; settled once in errs
	deadline time.Time
	dropped  <-chan struct{} // the link the batch went on; nil if none
	resumed  <-chan struct{} // non-nil if sent while stalled
}

// settled marks an outcome already turned into its result.
const settled Outcome = -1

// Wait implements relay.Pending.
func (b *fakeBatch) Wait(ctx context.Context) []error {
	if b.dropped == nil {
		return b.errs
	}
	if b.resumed == nil {
		b.settle(false) // a live broker's confirms are in at once
	}
	if !b.hasOpen() {
		return b.errs
	}
	t := time.NewTimer(time.Until(b.deadline))
	defer t.Stop()
	for {
		select {
		case <-b.resumed: // nil unless sent while stalled
			b.resumed = nil
			b.settle(false)
			if !b.hasOpen() {
				return b.errs
			}
		case <-t.C:
			return b.timedOut()
		case <-ctx.Done():
			return b.timedOut()
		case <-b.dropped:
			return b.lost()
		}
	}
}

func (b *fakeBatch) hasOpen() bool {
	return slices.ContainsFunc(b.open, func(o Outcome) bool { return o != settled })
}

// settle turns the outcomes still open into results; a Timeout outcome is
// left open unless timeout is true.
func (b *fakeBatch) settle(timeout bool) {
	for i, o := range b.open {
		var err *relay.PublishError
		switch o {
		case settled, Confirm:
		case Nack:
			err = &relay.PublishError{Reason: relay.ReasonNack, Err: errors.New("broker nacked the message")}
		case Unroutable:
			err = &relay.PublishError{Reason: relay.ReasonUnroutable, Accepted: b.f.AcceptUnroutable,
				Err: errors.New("returned by the broker: 312 NO_ROUTE")}
		case Timeout:
			if !timeout {
				continue
			}
			err = &relay.PublishError{Reason: relay.ReasonTimeout, Err: fmt.Errorf("no confirm within %s", b.f.ConfirmTimeout)}
		}
		if err != nil {
			b.errs[i] = err
		}
		b.open[i] = settled
	}
}

// timedOut fails every open message with a timeout and resets the link, as
// the AMQP publisher does so that late confirms cannot be mistaken.
func (b *fakeBatch) timedOut() []error {
	for i, o := range b.open {
		if o != settled {
			b.open[i] = Timeout
		}
	}
	b.settle(true)
	b.f.mu.Lock()
	defer b.f.mu.Unlock()
	if b.f.dropped == b.dropped {
		b.f.dropLocked(errReset)
	}
	return b.errs
}

// lost fails every open message: the link dropped before its confirm.
func (b *fakeBatch) lost() []error {
	for i, o := range b.open {
		if o != settled {
			b.errs[i] = &relay.PublishError{Reason: relay.ReasonConnection, Err: errLinkLost}
			b.open[i] = settled
		}
	}
	return b.errs
}
