// Command consumer is EduPulse's search indexer: it reads lesson, quiz and
// badge events from the edupulse.events exchange, "indexes" each one into
// edupulse.search_documents and prints a line. Delivery is at least once, so
// it records each message id in an inbox table (package inbox) in the same
// transaction as the index write, and drops messages it has seen.
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

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/outbox-relay/outbox-relay/examples/edupulse"
	"github.com/outbox-relay/outbox-relay/inbox"
	"github.com/outbox-relay/outbox-relay/schema"
)

const (
	localURL = "amqp://guest:guest@127.0.0.1:5672/"
	localDSN = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"
)

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
	dsn := flag.String("dsn", "", "PostgreSQL URL of the indexer's own database (default $OUTBOX_RELAY_POSTGRES_DSN, else "+localDSN+")")
	flag.Parse()
	if *count < 0 || flag.NArg() > 0 {
		fmt.Fprintln(os.Stderr, "consumer: -count must be 0 or more, and no arguments")
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	ix, err := newIndexer(ctx, cmp.Or(*dsn, os.Getenv("OUTBOX_RELAY_POSTGRES_DSN"), localDSN))
	if err != nil {
		fmt.Fprintln(os.Stderr, "consumer:", err)
		return 1
	}
	defer ix.pool.Close()
	if err := ix.run(ctx, cmp.Or(*url, os.Getenv("OUTBOX_RELAY_AMQP_URL"), localURL), *exchange, *queue, *durable, *count); err != nil {
		fmt.Fprintln(os.Stderr, "consumer:", err)
		return 1
	}
	return 0
}

type indexer struct {
	pool                                    *pgxpool.Pool
	inbox                                   *inbox.Inbox
	received, indexed, duplicates, rejected int
}

// newIndexer connects to the indexer's database and creates its tables: the
// inbox (by its migration) and the search documents.
func newIndexer(ctx context.Context, dsn string) (*indexer, error) {
	pool, err := pgxpool.New(ctx, dsn)
	if err != nil {
		return nil, fmt.Errorf("connect to the indexer's database: %w", err)
	}
	db := stdlib.OpenDBFromPool(pool)
	defer db.Close()
	m, err := schema.NewInboxMigrator(db, "edupulse", "search_inbox")
	if err == nil {
		_, err = m.Up(ctx)
	}
	if err == nil {
		_, err = pool.Exec(ctx, `CREATE TABLE IF NOT EXISTS edupulse.search_documents (
			message_id text PRIMARY KEY, event_type text NOT NULL, summary text NOT NULL,
			indexed_at timestamptz NOT NULL DEFAULT now())`)
	}
	if err != nil {
		pool.Close()
		return nil, fmt.Errorf("create the indexer's tables: %w", err)
	}
	in, err := inbox.New("edupulse", "search_inbox", "search-indexer")
	if err != nil {
		pool.Close()
		return nil, err
	}
	return &indexer{pool: pool, inbox: in}, nil
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
			if err := ix.handle(ctx, d); err != nil {
				return err
			}
		}
	}
	return nil
}

// handle indexes one delivery and settles it. The inbox record and the
// index write commit together, and the ack comes after the commit: a crash
// in between redelivers the message, which the inbox then drops.
func (ix *indexer) handle(ctx context.Context, d amqp.Delivery) error {
	ix.received++
	summary, err := edupulse.Summarize(d.RoutingKey, d.Body)
	if err != nil {
		// Redelivering a message we cannot read would loop forever; without a
		// dead-letter exchange on the queue, rejecting it drops it.
		ix.rejected++
		fmt.Printf("%-16s id=%s rejected: %v\n", d.RoutingKey, d.MessageId, err)
		return d.Nack(false, false)
	}
	var first bool
	err = pgx.BeginFunc(ctx, ix.pool, func(tx pgx.Tx) error {
		if first, err = ix.inbox.Claim(ctx, tx, d.MessageId); err != nil || !first {
			return err
		}
		_, err := tx.Exec(ctx, `INSERT INTO edupulse.search_documents (message_id, event_type, summary) VALUES ($1, $2, $3)`,
			d.MessageId, d.RoutingKey, summary)
		return err
	})
	if err != nil {
		return fmt.Errorf("index %s: %w", d.MessageId, err)
	}
	if !first {
		ix.duplicates++
		fmt.Printf("%-16s id=%s duplicate, dropped\n", d.RoutingKey, d.MessageId)
		return d.Ack(false)
	}
	ix.indexed++
	fmt.Printf("%-16s seq=%-6v id=%s corr=%s  %s\n",
		d.RoutingKey, d.Headers["x-outbox-seq"], d.MessageId, d.CorrelationId, summary)
	return d.Ack(false)
}
