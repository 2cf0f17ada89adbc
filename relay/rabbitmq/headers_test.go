package rabbitmq_test

import (
	"context"
	"reflect"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

// TestNestedHeadersArrive: a row's nested header objects, at any depth and
// inside arrays, reach the consumer as AMQP tables with their values: the
// engine decodes them as plain Go maps and the publisher turns them into
// field tables.
func TestNestedHeadersArrive(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	deliveries := b.Consume(t, b.Queue(t, "#", nil))
	if _, err := o.Pool.Exec(context.Background(), `INSERT INTO `+o.Table.Quoted()+` (event_type, payload, headers)
		VALUES ('nested.headers', '{}', '{"trace": {"id": "t-1", "hops": [1, {"via": "gw"}]}, "flat": "yes"}')`); err != nil {
		t.Fatal(err)
	}
	testenv.StartRelay(t, testenv.RelayConfig(o, b))
	d := testenv.Receive(t, deliveries, 1, 20*time.Second)[0]
	want := amqp.Table{"id": "t-1", "hops": []any{int64(1), amqp.Table{"via": "gw"}}}
	if got := d.Headers["trace"]; !reflect.DeepEqual(got, want) {
		t.Fatalf("header trace = %#v, want %#v", got, want)
	}
	if got := d.Headers["flat"]; got != "yes" {
		t.Fatalf("header flat = %#v, want \"yes\"", got)
	}
}
