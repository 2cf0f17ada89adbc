package rabbitmq_test

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
)

// TestClusterNodeStops checks that a relay given the three nodes of a
// RabbitMQ cluster, publishing a steady flow to a quorum queue, loses no
// event when the node it is connected to stops, and carries on from
// another node, which its metric names.
func TestClusterNodeStops(t *testing.T) {
	t.Parallel()
	nodes := testenv.StartRabbitMQCluster(t, 3, testenv.RabbitMQOptions{})
	urls := make([]string, len(nodes))
	for i, n := range nodes {
		urls[i] = n.URL()
	}
	o := testenv.NewOutbox(t)
	// The exchange, the queue and the consumer live on the last node; the
	// relay starts on the first node that answers, the first one.
	b := testenv.NewBrokerAt(t, nodes[2].URL())
	q := b.DurableQueue(t, "#", amqp.Table{"x-queue-type": "quorum"})
	deliveries := b.Consume(t, q)

	cfg := testenv.RelayConfig(o, b)
	cfg.AMQP.URL = strings.Join(urls, ",")
	r := testenv.StartRelay(t, cfg)
	onNode := func() int {
		on := -1
		for i, u := range urls {
			if testenv.Value(t, r.Metrics.AMQPNode.WithLabelValues(nodeOf(u))) == 1 {
				on = i
			}
		}
		return on
	}

	// A steady flow: 50 events every 20 ms, about 2,500/s, for 2 s.
	const perTx, txs = 50, 100
	want := make(map[string]outbox.Event, perTx*txs)
	ctx := context.Background()
	var written atomic.Int64
	done := make(chan error, 1)
	events := make([][]outbox.Event, txs)
	for n := range events {
		events[n] = make([]outbox.Event, perTx)
		for i := range events[n] {
			events[n][i] = outbox.NewEvent("order.placed", fmt.Appendf(nil, `{"tx":%d,"i":%d}`, n, i))
			want[events[n][i].ID.String()] = events[n][i]
		}
	}
	w, err := outbox.NewWriter(o.Schema, o.Table.Name)
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for _, batch := range events {
			<-tick.C
			tx, err := o.Pool.Begin(ctx)
			if err == nil {
				err = w.Write(ctx, tx, batch...)
			}
			if err == nil {
				err = tx.Commit(ctx)
			}
			if err != nil {
				done <- err
				return
			}
			written.Add(perTx)
		}
		done <- nil
	}()

	// Stop the node the relay publishes through once a third has flowed.
	testenv.Eventually(t, 30*time.Second, "a third of the events written and the relay on a node", func() bool {
		return written.Load() >= perTx*txs/3 && onNode() >= 0
	})
	first := onNode()
	t.Logf("stopping node %d (%s), the one the relay is on, after %d events written", first+1, nodes[first].Node(), written.Load())
	nodes[first].Stop(t)

	if err := <-done; err != nil {
		t.Fatalf("writer: %v", err)
	}
	dups := testenv.ReceiveAll(t, deliveries, want, time.Minute)
	t.Logf("all %d events delivered, %d duplicates (allowed)", len(want), dups)
	testenv.Eventually(t, 10*time.Second, "every row dispatched", func() bool {
		return o.Count(t, "dispatched_at IS NOT NULL") == len(want)
	})
	if now := onNode(); now < 0 || now == first {
		t.Fatalf("outbox_relay_amqp_node says node %d, want another node than the stopped %d", now+1, first+1)
	}
}

// nodeOf is the node label of a broker URL: its host:port.
func nodeOf(u string) string {
	_, rest, _ := strings.Cut(u, "@")
	host, _, _ := strings.Cut(rest, "/")
	return host
}
