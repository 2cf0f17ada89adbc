package rabbitmq

import (
	"fmt"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// headerFrameSize is the size on the wire of the content header frame that
// carries pub's properties and headers, frame overhead included: what the
// broker compares with the negotiated frame_max. Only the body is split
// into frames; a header frame over frame_max makes RabbitMQ close the
// connection (501 FRAME_ERROR, frame_too_large).
func headerFrameSize(pub amqp.Publishing) int {
	const frameOverhead = 8 // type, channel, size, frame-end
	n := 2 + 2 + 8 + 2      // class id, weight, body size, property flags
	short := func(s string) {
		if s != "" {
			n += 1 + len(s)
		}
	}
	short(pub.ContentType)
	short(pub.ContentEncoding)
	if len(pub.Headers) > 0 {
		n += tableSize(pub.Headers)
	}
	if pub.DeliveryMode != 0 {
		n++
	}
	if pub.Priority != 0 {
		n++
	}
	short(pub.CorrelationId)
	short(pub.ReplyTo)
	short(pub.Expiration)
	short(pub.MessageId)
	if !pub.Timestamp.IsZero() {
		n += 8
	}
	short(pub.Type)
	short(pub.UserId)
	short(pub.AppId)
	return n + frameOverhead
}

// tableSize is the encoded size of a field table, its length prefix included.
func tableSize(t amqp.Table) int {
	n := 4
	for k, v := range t {
		n += 1 + len(k) + fieldSize(v)
	}
	return n
}

// fieldSize is the encoded size of one field value, its type octet
// included, as amqp091-go writes it.
func fieldSize(v any) int {
	switch x := v.(type) {
	case nil:
		return 1
	case bool, byte, int8:
		return 2
	case int16, uint16:
		return 3
	case int, int32, uint32, float32:
		return 5
	case int64, float64, time.Time:
		return 9
	case amqp.Decimal:
		return 6
	case string:
		return 5 + len(x)
	case []byte:
		return 5 + len(x)
	case amqp.Table:
		return 1 + tableSize(x)
	case map[string]any:
		return 1 + tableSize(amqp.Table(x))
	case []any:
		n := 5
		for _, e := range x {
			n += fieldSize(e)
		}
		return n
	default:
		return 5 // unknown to amqp091-go: it refuses it before sending
	}
}

// routingHeaders are the headers RabbitMQ reads as extra routing keys
// (sender-selected distribution); it closes the channel over a publish
// where one is not an array (406 unacceptable_type_in_header).
var routingHeaders = []string{"CC", "BCC"}

// checkHeaders refuses header values the broker would close the channel
// over.
func checkHeaders(h amqp.Table) error {
	for _, name := range routingHeaders {
		v, ok := h[name]
		if !ok {
			continue
		}
		arr, isArray := v.([]any)
		if !isArray {
			return fmt.Errorf("header %q must be an array of strings (RabbitMQ reads it as extra routing keys and closes the channel over any other type), got %s", name, jsonType(v))
		}
		for _, e := range arr {
			if _, isString := e.(string); !isString {
				return fmt.Errorf("header %q must be an array of strings (extra routing keys), got an element of type %s", name, jsonType(e))
			}
		}
	}
	return nil
}

// jsonType names the JSON type of a decoded header value.
func jsonType(v any) string {
	switch v.(type) {
	case nil:
		return "null"
	case string:
		return "string"
	case bool:
		return "boolean"
	case int64, float64:
		return "number"
	case amqp.Table, map[string]any:
		return "object"
	case []any:
		return "array"
	}
	return fmt.Sprintf("%T", v)
}
