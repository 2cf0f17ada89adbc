package relaytest

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/outbox-relay/outbox-relay/relay"
)

// Routing keys of the suite's messages: the harness must bind a queue for
// RoutedKey and none for UnroutedKey.
const (
	RoutedKey   = "relaytest.routed"
	UnroutedKey = "relaytest.unrouted"
)

// Harness is one implementation under test, made fresh for each test of
// the suite, with the means to fail its link.
type Harness struct {
	// Publisher is the implementation, not yet connected, routing
	// RoutedKey to a queue and UnroutedKey nowhere.
	Publisher relay.Publisher
	// ConfirmTimeout is the Publisher's (amqp.confirm_timeout). The suite
	// needs it of at least a second, to tell it from a shorter ctx.
	ConfirmTimeout time.Duration
	// Stall makes the broker stop answering, the link up, until Resume.
	Stall, Resume func()
	// Cut drops the link as a network failure would; connecting again
	// works.
	Cut func()
}

// linkDropSlack bounds what a publisher may take, past its confirm
// timeout, to drop a link that stopped answering (the AMQP publisher gives
// connection.close two seconds).
const linkDropSlack = 4 * time.Second

// TestPublisher runs the contract every relay.Publisher keeps, each test on
// a harness of its own, in parallel. The engine relies on each point:
// results come back one per message and in order, a message's reason decides
// whether it is retried and charged, Wait never outlives the confirm
// timeout (the claim loop and shutdown wait on it), and the link methods
// can be called at any time.
func TestPublisher(t *testing.T, newHarness func(t *testing.T) Harness) {
	tests := []struct {
		name string
		test func(t *testing.T, h Harness)
	}{
		{"ReadyBeforeConnect", testReadyBeforeConnect},
		{"ConnectIdempotent", testConnectIdempotent},
		{"CloseIdempotent", testCloseIdempotent},
		{"EmptyBatch", testEmptyBatch},
		{"ResultsInOrder", testResultsInOrder},
		{"PipelinedBatches", testPipelinedBatches},
		{"SendConnects", testSendConnects},
		{"WaitRespectsContext", testWaitRespectsContext},
		{"WaitBoundedByConfirmTimeout", testWaitBoundedByConfirmTimeout},
		{"ConnectionLossIsTransient", testConnectionLossIsTransient},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			h := newHarness(t)
			t.Cleanup(func() { _ = h.Publisher.Close() })
			tc.test(t, h)
		})
	}
}

// Messages makes n messages routed by key, with distinct ids and bodies.
func Messages(key string, n int) []relay.Message {
	msgs := make([]relay.Message, n)
	for i := range msgs {
		msgs[i] = relay.Message{Seq: int64(i + 1), ID: uuid.New(), Type: "relaytest.event", RoutingKey: key,
			Body: fmt.Appendf(nil, `{"n":%d}`, i), ContentType: "application/json", CreatedAt: time.Now(),
			Headers: map[string]any{relay.HeaderSeq: int64(i + 1)}}
	}
	return msgs
}

func connect(t *testing.T, h Harness) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := h.Publisher.Connect(ctx); err != nil {
		t.Fatalf("Connect: %v", err)
	}
}

// wait waits for p with a generous ctx, checking one result per message.
func wait(t *testing.T, p relay.Pending, n int) []error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	errs := p.Wait(ctx)
	if len(errs) != n {
		t.Fatalf("Wait returned %d results for %d messages", len(errs), n)
	}
	return errs
}

// reason is the reason of a failed publish, failing the test for an
// error that is not a *relay.PublishError.
func reason(t *testing.T, i int, err error) *relay.PublishError {
	t.Helper()
	var pe *relay.PublishError
	if !errors.As(err, &pe) {
		t.Fatalf("message %d: error %v (%T) is not a *relay.PublishError", i, err, err)
	}
	return pe
}

// allConfirmed fails unless every result is nil.
func allConfirmed(t *testing.T, what string, errs []error) {
	t.Helper()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("%s: message %d: %v, want confirmed", what, i, err)
		}
	}
}

// allFailed fails unless every result is a failure with reason want.
func allFailed(t *testing.T, what string, errs []error, want relay.Reason) {
	t.Helper()
	for i, err := range errs {
		if err == nil {
			t.Fatalf("%s: message %d confirmed, want %s", what, i, want)
		}
		if pe := reason(t, i, err); pe.Reason != want {
			t.Fatalf("%s: message %d: %v, want reason %s", what, i, err, want)
		}
	}
}

// testReadyBeforeConnect: a new publisher is not ready, so the engine's
// link starts down and its first turn connects.
func testReadyBeforeConnect(t *testing.T, h Harness) {
	if err := h.Publisher.Ready(); err == nil {
		t.Fatal("Ready = nil before Connect, want an error")
	}
}

// testConnectIdempotent: Connect on a connected publisher is a no-op, and
// Ready says the link is up after it.
func testConnectIdempotent(t *testing.T, h Harness) {
	connect(t, h)
	connect(t, h)
	if err := h.Publisher.Ready(); err != nil {
		t.Fatalf("Ready after Connect: %v", err)
	}
	allConfirmed(t, "after two Connects", wait(t, h.Publisher.Send(context.Background(), Messages(RoutedKey, 3)), 3))
}

// testCloseIdempotent: Close may be called twice (Run and a caller's
// cleanup both may) and leaves the publisher not ready.
func testCloseIdempotent(t *testing.T, h Harness) {
	connect(t, h)
	if err := h.Publisher.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := h.Publisher.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if err := h.Publisher.Ready(); err == nil {
		t.Fatal("Ready = nil after Close, want an error")
	}
}

// testEmptyBatch: a batch of no messages settles at once with no results.
func testEmptyBatch(t *testing.T, h Harness) {
	connect(t, h)
	if errs := wait(t, h.Publisher.Send(context.Background(), nil), 0); len(errs) != 0 {
		t.Fatalf("empty batch: %v", errs)
	}
}

// testResultsInOrder: the i-th result is the i-th message's, so the engine
// marks exactly the confirmed rows: unroutable messages interleaved with
// routed ones fail at their own positions with reason unroutable, which is
// neither transient (an attempt is charged) nor permanent (it is retried).
func testResultsInOrder(t *testing.T, h Harness) {
	connect(t, h)
	routed, unrouted := Messages(RoutedKey, 6), Messages(UnroutedKey, 6)
	var msgs []relay.Message
	for i := range routed {
		if i%3 == 1 {
			msgs = append(msgs, unrouted[i])
		} else {
			msgs = append(msgs, routed[i])
		}
	}
	errs := wait(t, h.Publisher.Send(context.Background(), msgs), len(msgs))
	for i, err := range errs {
		if msgs[i].RoutingKey == RoutedKey {
			if err != nil {
				t.Errorf("message %d (routed): %v, want confirmed", i, err)
			}
			continue
		}
		if err == nil {
			t.Errorf("message %d (unrouted): confirmed, want reason unroutable", i)
			continue
		}
		pe := reason(t, i, err)
		if pe.Reason != relay.ReasonUnroutable || pe.Transient() || pe.Permanent() || pe.Accepted || pe.Deferred {
			t.Errorf("message %d (unrouted): %+v, want reason unroutable, retried and charged", i, pe)
		}
	}
}

// testPipelinedBatches: batches sent before the first is waited for (the
// engine keeps several in flight) each get their own results.
func testPipelinedBatches(t *testing.T, h Harness) {
	connect(t, h)
	var pending []relay.Pending
	var sizes []int
	for i, key := range []string{RoutedKey, UnroutedKey, RoutedKey} {
		n := 5 + i
		pending = append(pending, h.Publisher.Send(context.Background(), Messages(key, n)))
		sizes = append(sizes, n)
	}
	allConfirmed(t, "batch 1", wait(t, pending[0], sizes[0]))
	allFailed(t, "batch 2", wait(t, pending[1], sizes[1]), relay.ReasonUnroutable)
	allConfirmed(t, "batch 3", wait(t, pending[2], sizes[2]))
}

// testSendConnects: Send on a publisher never connected, or whose link was
// cut, connects by itself rather than fail the batch.
func testSendConnects(t *testing.T, h Harness) {
	allConfirmed(t, "first Send", wait(t, h.Publisher.Send(context.Background(), Messages(RoutedKey, 2)), 2))
	h.Cut()
	// The link may take a moment to notice the cut: a batch sent in that
	// moment fails as a connection loss; the next one goes through.
	deadline := time.Now().Add(10 * time.Second)
	for {
		errs := wait(t, h.Publisher.Send(context.Background(), Messages(RoutedKey, 2)), 2)
		if errs[0] == nil && errs[1] == nil {
			break
		}
		for i, err := range errs {
			if err != nil && !reason(t, i, err).Transient() {
				t.Fatalf("Send after a cut: message %d: %v, want confirmed or a transient failure", i, err)
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("Send after a cut still fails after 10s")
		}
	}
}

// testWaitRespectsContext: a Wait whose ctx ends returns then, well before
// the confirm timeout, one timeout per unconfirmed message: the engine's
// shutdown cancels its waits this way.
func testWaitRespectsContext(t *testing.T, h Harness) {
	connect(t, h)
	h.Stall()
	defer h.Resume()
	p := h.Publisher.Send(context.Background(), Messages(RoutedKey, 4))
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	errs := p.Wait(ctx)
	if took := time.Since(start); took > 100*time.Millisecond+linkDropSlack {
		t.Fatalf("Wait took %s after its ctx ended at 100ms", took)
	}
	if len(errs) != 4 {
		t.Fatalf("Wait returned %d results for 4 messages", len(errs))
	}
	allFailed(t, "stalled, ctx done", errs, relay.ReasonTimeout)
}

// testWaitBoundedByConfirmTimeout: a broker that stops answering fails the
// batch with reason timeout once the confirm timeout passes, however long
// the caller's ctx; the link recovers once the broker answers again.
func testWaitBoundedByConfirmTimeout(t *testing.T, h Harness) {
	connect(t, h)
	h.Stall()
	start := time.Now()
	errs := wait(t, h.Publisher.Send(context.Background(), Messages(RoutedKey, 3)), 3)
	took := time.Since(start)
	h.Resume()
	if took < h.ConfirmTimeout/2 || took > h.ConfirmTimeout+linkDropSlack {
		t.Fatalf("Wait took %s with a confirm timeout of %s", took, h.ConfirmTimeout)
	}
	allFailed(t, "stalled past the confirm timeout", errs, relay.ReasonTimeout)
	connect(t, h)
	allConfirmed(t, "after the stall", wait(t, h.Publisher.Send(context.Background(), Messages(RoutedKey, 2)), 2))
}

// testConnectionLossIsTransient: messages unconfirmed when the link drops
// fail with reason connection, which is transient (retried, no attempt
// charged); Ready reports the link down until Connect restores it.
func testConnectionLossIsTransient(t *testing.T, h Harness) {
	connect(t, h)
	h.Stall()
	p := h.Publisher.Send(context.Background(), Messages(RoutedKey, 4))
	h.Cut()
	errs := wait(t, p, 4)
	h.Resume()
	allFailed(t, "link cut before the confirms", errs, relay.ReasonConnection)
	for i, err := range errs {
		if !reason(t, i, err).Transient() {
			t.Fatalf("message %d: %v is not transient", i, err)
		}
	}
	if err := h.Publisher.Ready(); err == nil {
		t.Fatal("Ready = nil after the link was cut")
	}
	connect(t, h)
	allConfirmed(t, "after reconnecting", wait(t, h.Publisher.Send(context.Background(), Messages(RoutedKey, 2)), 2))
}
