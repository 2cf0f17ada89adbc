// Command consumer is EduPulse's search indexer: it reads lesson, quiz and
// badge events from the edupulse.events exchange and "indexes" them by
// printing one line each. Delivery is at least once, so it drops messages
// whose id it has already seen.
//
//	go run ./examples/edupulse/consumer -count 100
package main

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/outbox-relay/outbox-relay/examples/edupulse"
)

const localURL = "amqp://guest:guest@127.0.0.1:5672/"

// bindings cover whole event families, so new event types of a family reach
// the indexer without a change here.
var bindings = []string{"lesson.#", "quiz.#", "badge.#"}

func main() { os.Exit(run()) }

func run() int {
	url := flag.String("url", "", "AMQP URL (default $OUTBOX_RELAY_AMQP_URL, else "+localURL+")")
	exchange := flag.String("exchange", "edupulse.events", "topic exchange the relay publishes to")
	queue := flag.String("queue", "edupulse.search-indexer", "queue to declare and consume")
	durable := flag.Bool("durable", false, "declare a durable queue that keeps events while the indexer is down (default: exclusive, deleted on exit)")
	count := flag.Int("count", 0, "exit after indexing this many distinct events, 0 = until SIGINT/SIGTERM")
	flag.Parse()
	if *count < 0 || flag.NArg() > 0 {
		fmt.Fprintln(os.Stderr, "consumer: -count must be 0 or more, and no arguments")
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	ix := &indexer{seen: newSeenSet(10_000)}
	if err := ix.run(ctx, cmp.Or(*url, os.Getenv("OUTBOX_RELAY_AMQP_URL"), localURL), *exchange, *queue, *durable, *count); err != nil {
		fmt.Fprintln(os.Stderr, "consumer:", err)
		return 1
	}
	return 0
}

type indexer struct {
	seen                                    *seenSet
	received, indexed, duplicates, rejected int
}

func (ix *indexer) run(ctx context.Context, url, exchange, queue string, durable bool, count int) error {
	conn, err := amqp.DialConfig(url, amqp.Config{Properties: amqp.Table{"connection_name": "edupulse-search-indexer"}})
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return fmt.Errorf("open channel: %w", err)
	}
	// Same arguments as the relay's declaration (durable topic), so whichever
	// starts first creates it and the other's declare is a no-op.
	if err := ch.ExchangeDeclare(exchange, amqp.ExchangeTopic, true, false, false, false, nil); err != nil {
		return fmt.Errorf("declare exchange %s: %w", exchange, err)
	}
	q, err := ch.QueueDeclare(queue, durable, !durable, !durable, false, nil)
	if err != nil {
		return fmt.Errorf("declare queue %s: %w", queue, err)
	}
	for _, key := range bindings {
		if err := ch.QueueBind(q.Name, key, exchange, false, nil); err != nil {
			return fmt.Errorf("bind %s to %s with %s: %w", q.Name, exchange, key, err)
		}
	}
	if err := ch.Qos(64, 0, false); err != nil {
		return fmt.Errorf("set prefetch: %w", err)
	}
	deliveries, err := ch.Consume(q.Name, "search-indexer", false, false, false, false, nil)
	if err != nil {
		return fmt.Errorf("consume %s: %w", q.Name, err)
	}
	fmt.Printf("ready: queue %s bound to %s with %v\n", q.Name, exchange, bindings)
	defer func() {
		fmt.Printf("received %d messages: %d indexed, %d duplicates dropped, %d rejected\n",
			ix.received, ix.indexed, ix.duplicates, ix.rejected)
	}()

	for count == 0 || ix.indexed < count {
		select {
		case <-ctx.Done():
			return nil // unacked deliveries go back to the queue when the channel closes
		case d, ok := <-deliveries:
			if !ok {
				return errors.New("delivery channel closed: connection to the broker lost")
			}
			if err := ix.handle(d); err != nil {
				return err
			}
		}
	}
	return nil
}

// handle indexes one delivery and settles it. It acks only after indexing,
// so a crash before that gets the message redelivered, not lost.
func (ix *indexer) handle(d amqp.Delivery) error {
	ix.received++
	if d.MessageId != "" && !ix.seen.add(d.MessageId) {
		ix.duplicates++
		fmt.Printf("%-16s id=%s duplicate, dropped\n", d.RoutingKey, d.MessageId)
		return d.Ack(false)
	}
	summary, err := edupulse.Summarize(d.RoutingKey, d.Body)
	if err != nil {
		// Redelivering a message we cannot read would loop forever; without a
		// dead-letter exchange on the queue, rejecting it drops it.
		ix.rejected++
		fmt.Printf("%-16s id=%s rejected: %v\n", d.RoutingKey, d.MessageId, err)
		return d.Nack(false, false)
	}
	ix.indexed++
	fmt.Printf("%-16s seq=%-6v id=%s corr=%s  %s\n",
		d.RoutingKey, d.Headers["x-outbox-seq"], d.MessageId, d.CorrelationId, summary)
	return d.Ack(false)
}

// seenSet remembers the last n message ids, forgetting the oldest first. A
// duplicate comes from a relay retry shortly after the original, so a window
// of recent ids catches them; a durable inbox table would catch them all.
type seenSet struct {
	ids  map[string]struct{}
	ring []string
	next int
}

func newSeenSet(n int) *seenSet {
	return &seenSet{ids: make(map[string]struct{}, n), ring: make([]string, n)}
}

// add records id and reports whether it was new.
func (s *seenSet) add(id string) bool {
	if _, ok := s.ids[id]; ok {
		return false
	}
	if old := s.ring[s.next]; old != "" {
		delete(s.ids, old)
	}
	s.ring[s.next] = id
	s.ids[id] = struct{}{}
	s.next = (s.next + 1) % len(s.ring)
	return true
}
