package rabbitmq_test

import (
	"net/url"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/relay/relaytest"
)

// TestConformance: the rabbitmq publisher keeps the relay.Publisher
// contract on the real broker, each test with an exchange of its own and a
// proxy in front of the broker to stall or cut the link.
func TestConformance(t *testing.T) {
	t.Parallel()
	relaytest.TestPublisher(t, func(t *testing.T) relaytest.Harness {
		b := testenv.NewBroker(t)
		b.Queue(t, relaytest.RoutedKey, nil)
		u, err := url.Parse(b.URL)
		if err != nil {
			t.Fatal(err)
		}
		proxy := relaytest.NewProxy(t, u.Host)
		u.Host = proxy.Addr()
		declare := false
		cfg := relay.Config{AMQP: relay.AMQPConfig{URL: u.String(), Exchange: b.Exchange, DeclareExchange: &declare,
			ConfirmTimeout: 1500 * time.Millisecond}}.WithDefaults()
		pub := testenv.NewAMQPPublisher(t, cfg.AMQP, 50, zaptest.NewLogger(t))
		return relaytest.Harness{Publisher: pub, ConfirmTimeout: cfg.AMQP.ConfirmTimeout, Stall: proxy.Stall, Resume: proxy.Resume, Cut: proxy.Cut}
	})
}
