package rabbitmq_test

import (
	"net/url"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/relay/rabbitmq"
	"github.com/outbox-relay/outbox-relay/relay/relaytest"
)

// TestConformance: the rabbitmq publisher keeps the relay.Publisher
// contract on the real broker, each test with an exchange of its own and a
// proxy in front of the broker to stall or cut the link.
func TestConformance(t *testing.T) {
	t.Parallel()
	relaytest.TestPublisher(t, func(t *testing.T) relaytest.Harness {
		l := newProxiedLink(t, 50, 0)
		return relaytest.Harness{Publisher: l.pub, ConfirmTimeout: l.confirmTimeout, Stall: l.proxy.Stall, Resume: l.proxy.Resume, Cut: l.proxy.Cut}
	})
}

// proxiedLink is a publisher with the given batch window on an exchange of its
// own, bound to queue by relaytest.RoutedKey, through a proxy that can stall
// or cut the link.
type proxiedLink struct {
	broker         *testenv.Broker
	queue          string
	proxy          *relaytest.Proxy
	pub            *rabbitmq.Publisher
	confirmTimeout time.Duration
}

// maxUnconfirmed is amqp.max_unconfirmed, 0 for its default.
func newProxiedLink(t *testing.T, window, maxUnconfirmed int) proxiedLink {
	t.Helper()
	b := testenv.NewBroker(t)
	queue := b.Queue(t, relaytest.RoutedKey, nil)
	u, err := url.Parse(b.URL)
	if err != nil {
		t.Fatal(err)
	}
	proxy := relaytest.NewProxy(t, u.Host)
	u.Host = proxy.Addr()
	declare := false
	cfg := relay.Config{AMQP: relay.AMQPConfig{URL: u.String(), Exchange: b.Exchange, DeclareExchange: &declare,
		ConfirmTimeout: 1500 * time.Millisecond, MaxUnconfirmed: maxUnconfirmed}}.WithDefaults()
	pub := testenv.NewAMQPPublisher(t, cfg.AMQP, window, zaptest.NewLogger(t))
	return proxiedLink{broker: b, queue: queue, proxy: proxy, pub: pub, confirmTimeout: cfg.AMQP.ConfirmTimeout}
}
