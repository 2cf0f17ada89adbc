package relay_test

import (
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

// TestConfirmTimeoutRecordedWhileBlockedBrokerSendsHeartbeats: closing the
// connection of a timed-out batch is bounded even though the blocked broker,
// which never answers connection.close, keeps sending heartbeats.
//
// amqp091-go's heartbeater pushes the read deadline out by three heartbeat
// intervals at every frame received, undoing CloseDeadline's deadline. An
// idle RabbitMQ sends a heartbeat every half interval: with a 2 s heartbeat
// one arrives during every close (with the relay's 10 s, during some).
func TestConfirmTimeoutRecordedWhileBlockedBrokerSendsHeartbeats(t *testing.T) {
	t.Parallel()
	rmq, o, deliveries, r := blockedBrokerWith(t, testenv.RabbitMQOptions{Conf: []string{"heartbeat = 2"}})

	unblock := blockPublishers(t, rmq)
	blocked := o.WriteEvents(t, "invoice.sent", 5)
	// Claim, the 1 s confirm timeout and a close bounded at 2 s; the alarm
	// lasts until unblock, so without the bound nothing is recorded.
	testenv.Eventually(t, 20*time.Second, "blocked events retried with a timeout error while blocked", func() bool {
		return o.Count(t, "id = ANY($1::uuid[]) AND attempts >= 1 AND last_error LIKE 'timeout%'", ids(blocked)) == len(blocked)
	})
	// And again on the connection dialled after the first close.
	testenv.Eventually(t, 20*time.Second, "blocked events retried twice while blocked", func() bool {
		return o.Count(t, "id = ANY($1::uuid[]) AND attempts >= 2", ids(blocked)) == len(blocked)
	})
	if n := o.Count(t, "id = ANY($1::uuid[]) AND dispatched_at IS NOT NULL", ids(blocked)); n != 0 {
		t.Errorf("%d events dispatched without a confirm", n)
	}
	unblock()
	testenv.ReceiveAll(t, deliveries, blocked, 30*time.Second)
	testenv.Eventually(t, 20*time.Second, "blocked events dispatched after the alarm cleared", func() bool {
		return o.Count(t, "id = ANY($1::uuid[]) AND dispatched_at IS NOT NULL", ids(blocked)) == len(blocked)
	})
	testenv.Eventually(t, 10*time.Second, "relay ready", func() bool { return r.Ready() == nil })
}
