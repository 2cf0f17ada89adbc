package testenv

import (
	"testing"
	"time"
)

// StartRabbitMQCluster starts n private RabbitMQ nodes (StartRabbitMQWith)
// sharing one Erlang cookie and joins them into one cluster with rabbitmqctl
// join_cluster, the first node as the seed. Each node keeps its own AMQP
// port and its own cleanup.
func StartRabbitMQCluster(t testing.TB, n int, opts RabbitMQOptions) []*RabbitMQ {
	t.Helper()
	begin := time.Now()
	if opts.Cookie == "" {
		opts.Cookie = randomHex(16)
	}
	nodes := make([]*RabbitMQ, n)
	for i := range nodes {
		nodes[i] = StartRabbitMQWith(t, opts)
	}
	for _, node := range nodes[1:] {
		node.Ctl(t, "stop_app")
		node.Ctl(t, "join_cluster", nodes[0].Node())
		node.Ctl(t, "start_app")
	}
	t.Logf("testenv: rabbitmq cluster of %d nodes ready in %v", n, time.Since(begin).Round(time.Millisecond))
	return nodes
}
