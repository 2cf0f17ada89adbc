package rabbitmq

import (
	"net"
	"net/url"

	"github.com/outbox-relay/outbox-relay/metrics"
)

// nodeName names a broker by its URL's host:port (never its credentials),
// for logs and the outbox_relay_amqp_node metric.
func nodeName(rawURL string) string {
	u, err := url.Parse(rawURL)
	if err != nil || u.Host == "" {
		return "unparsable-url"
	}
	if u.Port() != "" {
		return u.Host
	}
	port := "5672"
	if u.Scheme == "amqps" {
		port = "5671"
	}
	return net.JoinHostPort(u.Hostname(), port)
}

// NodeGauge creates outbox_relay_amqp_node at 0 for every node of urls and
// returns the function that marks the one connected to: Options.OnNode
// for a relay that serves metrics.
func NodeGauge(m *metrics.Metrics, urls []string) func(i int) {
	nodes := make([]string, len(urls))
	for i, u := range urls {
		nodes[i] = nodeName(u)
		m.AMQPNode.WithLabelValues(nodes[i]).Set(0)
	}
	return func(i int) {
		for _, n := range nodes {
			m.AMQPNode.WithLabelValues(n).Set(0)
		}
		m.AMQPNode.WithLabelValues(nodes[i]).Set(1)
	}
}
