package rabbitmq

import (
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/outbox-relay/outbox-relay/relay"
)

// toPublishing is the AMQP message for m in the plain format.
func toPublishing(m *relay.Message) amqp.Publishing {
	return amqp.Publishing{
		Headers:       table(m.Headers),
		ContentType:   m.ContentType,
		DeliveryMode:  amqp.Persistent,
		CorrelationId: m.CorrelationID,
		MessageId:     m.ID.String(),
		Timestamp:     m.CreatedAt,
		Type:          m.Type,
		AppId:         "outbox-relay",
		Body:          m.Body,
	}
}

// table turns decoded headers (relay.DecodeHeaders: nested objects are
// map[string]any) into an AMQP field table: amqp091-go encodes nested
// tables only as amqp.Table. Headers without nested objects, the common
// case, are used as they are, without a copy.
func table(h map[string]any) amqp.Table {
	if !hasObject(h) {
		return amqp.Table(h)
	}
	t := make(amqp.Table, len(h))
	for k, v := range h {
		t[k] = fieldValue(v)
	}
	return t
}

// fieldValue is v with every nested object, at any depth, an amqp.Table.
func fieldValue(v any) any {
	switch x := v.(type) {
	case map[string]any:
		return table(x)
	case amqp.Table:
		return table(x)
	case []any:
		out := make([]any, len(x))
		for i, e := range x {
			out[i] = fieldValue(e)
		}
		return out
	default:
		return v
	}
}

// hasObject reports whether a value of h is, or holds, a map[string]any.
func hasObject(h map[string]any) bool {
	for _, v := range h {
		if nested(v) {
			return true
		}
	}
	return false
}

func nested(v any) bool {
	switch x := v.(type) {
	case map[string]any:
		return true
	case amqp.Table:
		return hasObject(x)
	case []any:
		for _, e := range x {
			if nested(e) {
				return true
			}
		}
	}
	return false
}
