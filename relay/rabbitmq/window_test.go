package rabbitmq_test

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/relay/rabbitmq"
	"github.com/outbox-relay/outbox-relay/relay/relaytest"
)

// connectedWindow is a connected publisher keeping at most window messages
// unconfirmed (newProxiedLink), a context for the test, and the count of
// messages in its queue.
func connectedWindow(t *testing.T, window int) (proxiedLink, context.Context, func() int) {
	t.Helper()
	l := newProxiedLink(t, 50, window)
	ch := l.broker.Channel(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	if err := l.pub.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	queued := func() int {
		q, err := ch.QueueDeclarePassive(l.queue, false, false, false, false, nil)
		if err != nil {
			t.Fatalf("inspect queue: %v", err)
		}
		return q.Messages
	}
	return l, ctx, queued
}

// TestSendKeepsMaxUnconfirmed: the publisher keeps at most
// amqp.max_unconfirmed messages awaiting their confirm, across batches and
// within one. With the broker's confirms held, a batch of 6 and one of 10
// (window 10) put only 10 messages in the queue, and the second Send does
// not return; once the confirms resume, the rest is sent and all 16 are
// confirmed.
func TestSendKeepsMaxUnconfirmed(t *testing.T) {
	t.Parallel()
	const window = 10
	l, ctx, queued := connectedWindow(t, window)

	l.proxy.Stall()
	first := l.pub.Send(ctx, relaytest.Messages(relaytest.RoutedKey, 6))
	sent := make(chan relay.Pending, 1)
	go func() { sent <- l.pub.Send(ctx, relaytest.Messages(relaytest.RoutedKey, 10)) }()
	for queued() < window {
		if ctx.Err() != nil {
			t.Fatalf("only %d messages reached the queue, want the window of %d", queued(), window)
		}
		time.Sleep(10 * time.Millisecond)
	}
	// For a third of the confirm timeout (no batch fails before it ends),
	// the second batch stays part-sent.
	watch := time.After(l.confirmTimeout / 3)
	for done := false; !done; {
		select {
		case <-sent:
			t.Fatalf("Send returned the second batch while %d messages awaited their confirms (max %d); queue holds %d", window, window, queued())
		case <-watch:
			done = true
		case <-time.After(20 * time.Millisecond):
			if n := queued(); n > window {
				t.Fatalf("queue holds %d messages with their confirms held, want at most amqp.max_unconfirmed = %d", n, window)
			}
		}
	}

	l.proxy.Resume()
	second := <-sent
	for what, p := range map[string]relay.Pending{"first": first, "second": second} {
		for i, err := range p.Wait(ctx) {
			if err != nil {
				t.Fatalf("%s batch, message %d: %v", what, i, err)
			}
		}
	}
	if n := queued(); n != 16 {
		t.Fatalf("queue holds %d messages after both batches, want 16", n)
	}
}

// TestSendGathersItsWrites: a batch that fits the window leaves in one
// write to the socket, not one per message (amqp091-go flushes each), and
// every message of it is confirmed and queued.
func TestSendGathersItsWrites(t *testing.T) {
	t.Parallel()
	const batch = 50
	// A heartbeat may go out on its own meanwhile.
	if n := sendCountingWrites(t, 100, batch); n > 2 {
		t.Errorf("a batch of %d took %d writes to the socket, want 1", batch, n)
	}
}

// sendCountingWrites sends batch routed messages through a window of
// window, checks that every one is confirmed and queued, and returns how
// many writes to the socket Send made.
func sendCountingWrites(t *testing.T, window, batch int) int {
	t.Helper()
	l, ctx, queued := connectedWindow(t, window)
	before := rabbitmq.SocketWrites(l.pub)
	p := l.pub.Send(ctx, relaytest.Messages(relaytest.RoutedKey, batch))
	writes := rabbitmq.SocketWrites(l.pub) - before
	for i, err := range p.Wait(ctx) {
		if err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
	}
	if n := queued(); n != batch {
		t.Fatalf("queue holds %d messages, want %d", n, batch)
	}
	return writes
}

// TestSendRefillsTheWindowByHalves: a batch far larger than the window
// goes out half the window at a time as confirms come in, each step in one
// write, not one message per confirm; every message is confirmed and
// queued.
func TestSendRefillsTheWindowByHalves(t *testing.T) {
	t.Parallel()
	const window, batch = 100, 2000
	// The first window in one write, then a write per half at most, and
	// the last; heartbeats may add a few.
	if n, most := sendCountingWrites(t, window, batch), 1+(batch-window)/(window/2)+1+3; n > most {
		t.Errorf("a batch of %d through a window of %d took %d writes to the socket, want at most %d", batch, window, n, most)
	}
}

// TestWaitCountsConfirmsAlreadyIn: a batch whose confirms are all in is
// confirmed by a Wait whose ctx has already ended (shutdown's last waits),
// not failed as timed out by a select that picked the ctx.
func TestWaitCountsConfirmsAlreadyIn(t *testing.T) {
	t.Parallel()
	const batch = 20
	l, ctx, _ := connectedWindow(t, 100)
	first := l.pub.Send(ctx, relaytest.Messages(relaytest.RoutedKey, batch))
	// The broker confirms a channel's messages in order: once the second
	// batch is confirmed, so is the first.
	for i, err := range l.pub.Send(ctx, relaytest.Messages(relaytest.RoutedKey, 1)).Wait(ctx) {
		if err != nil {
			t.Fatalf("second batch, message %d: %v", i, err)
		}
	}
	ended, cancel := context.WithCancel(ctx)
	cancel()
	for i, err := range first.Wait(ended) {
		if err != nil {
			t.Errorf("message %d, confirmed before the ctx ended: %v", i, err)
		}
	}
}

// TestLateReturnsDoNotFailTheRetry: a batch's returns that come after it
// timed out (the broker returned its messages while its answers were held)
// do not fail the same messages sent again, routed this time, as the relay
// retries them: the publisher has started over on a fresh channel.
func TestLateReturnsDoNotFailTheRetry(t *testing.T) {
	t.Parallel()
	l, ctx, queued := connectedWindow(t, 100)
	msgs := relaytest.Messages(relaytest.UnroutedKey, 3)
	l.proxy.Stall()
	for i, err := range l.pub.Send(ctx, msgs).Wait(ctx) {
		if pe, ok := err.(*relay.PublishError); !ok || pe.Reason != relay.ReasonTimeout {
			t.Fatalf("message %d, its answers held past the confirm timeout: %v, want reason timeout", i, err)
		}
	}
	l.proxy.Resume()
	retry := slices.Clone(msgs)
	for i := range retry {
		retry[i].RoutingKey = relaytest.RoutedKey
	}
	for i, err := range l.pub.Send(ctx, retry).Wait(ctx) {
		if err != nil {
			t.Errorf("message %d sent again, routed: %v", i, err)
		}
	}
	if n := queued(); n != len(retry) {
		t.Fatalf("queue holds %d messages, want %d", n, len(retry))
	}
}

// TestSendStopsWhenContextEnds: Send waiting for the window to free stops
// when its ctx ends (an ordered batch's lease margin): the messages not yet
// sent fail as deferred, unsent, with the link fine, and never reach the
// queue.
func TestSendStopsWhenContextEnds(t *testing.T) {
	t.Parallel()
	const window = 10
	l, ctx, queued := connectedWindow(t, window)

	l.proxy.Stall()
	sendCtx, stop := context.WithTimeout(ctx, l.confirmTimeout/5)
	defer stop()
	errs := l.pub.Send(sendCtx, relaytest.Messages(relaytest.RoutedKey, 25))
	if sendCtx.Err() == nil {
		t.Fatal("Send returned before its ctx ended, with the window full and the confirms held")
	}
	l.proxy.Resume()
	results := errs.Wait(ctx)
	for i, err := range results {
		if i < window {
			if err != nil {
				t.Errorf("message %d, sent before the window filled: %v", i, err)
			}
			continue
		}
		var pe *relay.PublishError
		if !errors.As(err, &pe) || !pe.Deferred || pe.Reason != relay.ReasonConnection {
			t.Errorf("message %d: %v, want a deferred connection failure (not sent)", i, err)
		}
	}
	if n := queued(); n != window {
		t.Errorf("queue holds %d messages, want the %d sent before ctx ended", n, window)
	}
	if err := l.pub.Ready(); err != nil {
		t.Errorf("Ready after a Send cut short by its ctx: %v, want the link up", err)
	}
}
