package rabbitmq_test

import (
	"context"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/relay/relaytest"
)

// TestSendKeepsOneWindowUnconfirmed: a batch sent while the one before
// awaits its confirms goes out as they arrive. With the broker's confirms
// held, the second batch's Send does not return and the queue holds only
// the first batch; once they resume, the second batch is sent and both are
// confirmed.
func TestSendKeepsOneWindowUnconfirmed(t *testing.T) {
	t.Parallel()
	const window = 10
	l := newProxiedLink(t, window)
	ch := l.broker.Channel(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := l.pub.Connect(ctx); err != nil {
		t.Fatal(err)
	}

	l.proxy.Stall()
	first := l.pub.Send(ctx, relaytest.Messages(relaytest.RoutedKey, window))
	queued := func() int {
		q, err := ch.QueueDeclarePassive(l.queue, false, false, false, false, nil)
		if err != nil {
			t.Fatalf("inspect queue: %v", err)
		}
		return q.Messages
	}
	for queued() < window {
		if ctx.Err() != nil {
			t.Fatalf("the first batch never reached the queue: %d of %d", queued(), window)
		}
		time.Sleep(10 * time.Millisecond)
	}
	sent := make(chan struct{})
	var second interface{ Wait(context.Context) []error }
	go func() {
		defer close(sent)
		second = l.pub.Send(ctx, relaytest.Messages(relaytest.RoutedKey, window))
	}()
	// While the confirms are held, for a third of the confirm timeout (the
	// batches are not failed yet): the second batch must stay unsent.
	watch := time.After(l.confirmTimeout / 3)
	for done := false; !done; {
		select {
		case <-sent:
			t.Fatalf("Send returned a second batch while %d messages awaited their confirms (window %d); queue holds %d", window, window, queued())
		case <-watch:
			done = true
		case <-time.After(20 * time.Millisecond):
			if n := queued(); n > window {
				t.Fatalf("queue holds %d messages with %d unconfirmed before them, want at most the window of %d", n, window, window)
			}
		}
	}

	l.proxy.Resume()
	<-sent
	for i, err := range first.Wait(ctx) {
		if err != nil {
			t.Fatalf("first batch, message %d: %v", i, err)
		}
	}
	for i, err := range second.Wait(ctx) {
		if err != nil {
			t.Fatalf("second batch, message %d: %v", i, err)
		}
	}
	if n := queued(); n != 2*window {
		t.Fatalf("queue holds %d messages after both batches, want %d", n, 2*window)
	}
}
