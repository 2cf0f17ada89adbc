package testenv

import (
	"bytes"
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/jackc/pgx/v5"
	amqp "github.com/rabbitmq/amqp091-go"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/outbox-relay/outbox-relay/outbox"
)

// WriteEvents commits n events of type typ in one transaction and returns
// them by message id.
func (o *Outbox) WriteEvents(t testing.TB, typ string, n int) map[string]outbox.Event {
	t.Helper()
	events := make([]outbox.Event, n)
	byID := make(map[string]outbox.Event, n)
	for i := range events {
		events[i] = outbox.NewEvent(typ, fmt.Appendf(nil, `{"type":%q,"n":%d}`, typ, i))
		byID[events[i].ID.String()] = events[i]
	}
	o.Commit(t, events...)
	return byID
}

// Commit writes events with outbox.Writer in one transaction.
func (o *Outbox) Commit(t testing.TB, events ...outbox.Event) {
	t.Helper()
	w, err := outbox.NewWriter(o.Schema, o.Table.Name)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := pgx.BeginFunc(ctx, o.Pool, func(tx pgx.Tx) error { return w.Write(ctx, tx, events...) }); err != nil {
		t.Fatalf("write %d events: %v", len(events), err)
	}
}

// ReceiveAll consumes d until every event of want has arrived with its exact
// body, failing on a message that was not written or on the deadline. It
// returns how many duplicates arrived meanwhile (at-least-once allows them);
// a late copy of an event of earlier counts as one.
func ReceiveAll(t testing.TB, d <-chan amqp.Delivery, want map[string]outbox.Event, timeout time.Duration, earlier ...map[string]outbox.Event) (duplicates int) {
	t.Helper()
	return ReceiveAllAs(t, d, want, timeout, func(m amqp.Delivery) ([]byte, error) { return m.Body, nil }, earlier...)
}

// ReceiveAllAs is ReceiveAll for messages that carry their event's payload
// inside their body (a structured CloudEvent): payload returns it.
func ReceiveAllAs(t testing.TB, d <-chan amqp.Delivery, want map[string]outbox.Event, timeout time.Duration,
	payload func(amqp.Delivery) ([]byte, error), earlier ...map[string]outbox.Event) (duplicates int) {
	t.Helper()
	seen := make(map[string]bool, len(want))
	isEarlier := func(id string) bool {
		for _, m := range earlier {
			if _, ok := m[id]; ok {
				return true
			}
		}
		return false
	}
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for len(seen) < len(want) {
		select {
		case m, ok := <-d:
			if !ok {
				t.Fatalf("consumer closed after %d of %d events", len(seen), len(want))
			}
			ev, known := want[m.MessageId]
			if !known && isEarlier(m.MessageId) {
				duplicates++
				continue
			}
			if !known {
				t.Fatalf("unexpected message %s (type %s, %d bytes)", m.MessageId, m.Type, len(m.Body))
			}
			got, err := payload(m)
			if err != nil {
				t.Fatalf("%s: %v (body %q)", m.MessageId, err, m.Body)
			}
			if !bytes.Equal(got, ev.Payload) {
				t.Fatalf("%s: payload %q, want %q", m.MessageId, got, ev.Payload)
			}
			if seen[m.MessageId] {
				duplicates++
			}
			seen[m.MessageId] = true
		case <-deadline.C:
			t.Fatalf("received %d of %d events within %s", len(seen), len(want), timeout)
		}
	}
	return duplicates
}

// LinkLogs counts the log entries with message msg ("link down", "link
// restored") for link.
func LinkLogs(logs *observer.ObservedLogs, msg, link string) int {
	return logs.FilterMessage(msg).FilterField(zap.String("link", link)).Len()
}

// Value reads one counter or gauge.
func Value(t testing.TB, m prometheus.Metric) float64 {
	t.Helper()
	var pb dto.Metric
	if err := m.Write(&pb); err != nil {
		t.Fatal(err)
	}
	if c := pb.GetCounter(); c != nil {
		return c.GetValue()
	}
	return pb.GetGauge().GetValue()
}
