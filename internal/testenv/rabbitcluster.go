package testenv

import (
	"sync"
	"testing"
	"time"
)

// StartRabbitMQCluster starts n private RabbitMQ nodes (as StartRabbitMQWith
// does, booting them side by side) sharing one Erlang cookie, and joins them
// into one cluster with rabbitmqctl join_cluster, the first node as the
// seed. Each node keeps its own AMQP port and its own cleanup.
func StartRabbitMQCluster(t testing.TB, n int, opts RabbitMQOptions) []*RabbitMQ {
	t.Helper()
	begin := time.Now()
	if opts.Cookie == "" {
		opts.Cookie = randomHex(16)
	}
	nodes := make([]*RabbitMQ, n)
	for i := range nodes {
		nodes[i] = newRabbitMQ(t, opts)
	}
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i, node := range nodes {
		wg.Go(func() { errs[i] = node.start() })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("testenv: rabbitmq cluster node %d: %v", i+1, err)
		}
	}
	booted := time.Since(begin)
	for _, node := range nodes[1:] {
		node.Ctl(t, "stop_app")
		node.Ctl(t, "join_cluster", nodes[0].Node())
		node.Ctl(t, "start_app")
	}
	t.Logf("testenv: rabbitmq cluster of %d nodes ready in %v (booted in %v)", n, time.Since(begin).Round(time.Millisecond), booted.Round(time.Millisecond))
	return nodes
}
