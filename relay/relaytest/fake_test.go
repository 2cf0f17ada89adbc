package relaytest_test

import (
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/relay/relaytest"
)

// TestFakeConformance: the fake keeps the contract the rabbitmq publisher
// keeps on the real broker (relay/rabbitmq's TestConformance runs the same
// suite), so engine tests that use it hold for the real thing.
func TestFakeConformance(t *testing.T) {
	t.Parallel()
	relaytest.TestPublisher(t, func(t *testing.T) relaytest.Harness {
		f := relaytest.NewFake()
		f.ConfirmTimeout = 1500 * time.Millisecond
		f.Route = func(m relay.Message) bool { return m.RoutingKey != relaytest.UnroutedKey }
		return relaytest.Harness{Publisher: f, ConfirmTimeout: f.ConfirmTimeout, Stall: f.Stall, Resume: f.Resume, Cut: f.Cut}
	})
}
