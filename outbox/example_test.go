package outbox_test

import (
	"context"
	"fmt"
	"log"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/outbox"
)

type LessonPublished struct {
	LessonID string `json:"lesson_id"`
	Title    string `json:"title"`
}

// Write an event in the same transaction as the domain change it reports:
// both exist if the transaction commits, neither if it rolls back.
func ExampleWriter_Write() {
	ctx := context.Background()
	pool, schemaName, cleanup := exampleDatabase() // a throwaway schema with a migrated outbox
	defer cleanup()

	w, err := outbox.NewWriter(schemaName, "outbox")
	if err != nil {
		log.Fatal(err)
	}
	err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `INSERT INTO lessons (id, title) VALUES ($1, $2)`, "l-42", "Fractions"); err != nil {
			return err
		}
		ev, err := outbox.NewJSONEvent("lesson.published", LessonPublished{LessonID: "l-42", Title: "Fractions"})
		if err != nil {
			return err
		}
		ev.Key = "l-42"               // events of one lesson stay in order
		ev.CorrelationID = "req-7f3a" // ties the event to the request that caused it
		ev.Headers = map[string]string{"schema-version": "1"}
		return w.Write(ctx, tx, ev)
	})
	if err != nil {
		log.Fatal(err)
	}

	var eventType, payload string
	err = pool.QueryRow(ctx, `SELECT event_type, convert_from(payload, 'UTF8') FROM outbox`).Scan(&eventType, &payload)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(eventType, payload)
	// Output: lesson.published {"lesson_id":"l-42","title":"Fractions"}
}

// Invalid events are rejected before anything is sent to the database.
func ExampleEvent_Validate() {
	ev := outbox.NewEvent("", []byte(`{}`))
	fmt.Println(ev.Validate())
	// Output: outbox: invalid event: Type is empty: set the event type, e.g. "lesson.published"
}

// Route one event elsewhere than the relay's exchange and event-type key:
// a routing key of the tenant, on an exchange listed in the relay's
// amqp.exchanges. Events that leave both empty keep the defaults.
func ExampleEvent_routing() {
	ctx := context.Background()
	pool, schemaName, cleanup := exampleDatabase()
	defer cleanup()

	w, err := outbox.NewWriter(schemaName, "outbox")
	if err != nil {
		log.Fatal(err)
	}
	ev := outbox.NewEvent("invoice.paid", []byte(`{"invoice":"i-9"}`))
	ev.RoutingKey = "tenant-7"     // instead of "invoice.paid"
	ev.Exchange = "billing.events" // instead of amqp.exchange
	if err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error { return w.Write(ctx, tx, ev) }); err != nil {
		log.Fatal(err)
	}

	var key, exchange string
	if err := pool.QueryRow(ctx, `SELECT routing_key, exchange FROM outbox`).Scan(&key, &exchange); err != nil {
		log.Fatal(err)
	}
	fmt.Println(exchange, key)
	// Output: billing.events tenant-7
}
