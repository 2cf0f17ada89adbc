// Package outbox is what an application imports to write events to the
// transactional outbox. Events are inserted with the caller's transaction and
// exist only if that transaction commits; the relay (cmd/outbox-relay) then
// publishes them to RabbitMQ. The package never opens a connection, begins or
// commits a transaction, or retries.
package outbox

import (
	"encoding/json"
	"errors"
	"fmt"
	"time"
	"unicode/utf8"

	"github.com/google/uuid"
)

// ContentTypeJSON is the default content type of an event's payload.
const ContentTypeJSON = "application/json"

// MaxHeaderNameLen is AMQP's limit on a header (field table) name.
const MaxHeaderNameLen = 255

// Event is one message to publish. Only Type and Payload are required.
//
// On the wire (see README "Wire contract") Type is the routing key (unless
// RoutingKey overrides it) and the AMQP type, Payload is the body byte for
// byte, ID is the message-id.
type Event struct {
	// ID is the event's unique id, used as the AMQP message-id so consumers can
	// drop duplicates. Zero means a new UUIDv7 is assigned by Write.
	ID uuid.UUID
	// Type is the event type, e.g. "lesson.published": the routing key. Required.
	Type string
	// Key is the partition key (usually the aggregate id). Events with the
	// same key are published in order when the relay runs with ordering on.
	// Empty means no key.
	Key string
	// Payload is published as the message body, unchanged. Required (may be
	// empty but not nil).
	Payload []byte
	// ContentType defaults to application/json.
	ContentType string
	// Headers become AMQP message headers (string values).
	Headers map[string]string
	// CorrelationID is copied to the AMQP correlation-id property.
	CorrelationID string
	// AvailableAt delays publication until that time. Zero means now.
	AvailableAt time.Time
	// RoutingKey, if set, is the AMQP routing key instead of Type (a tenant
	// or region, say); Type stays the AMQP type.
	RoutingKey string
	// Exchange, if set, is the exchange to publish to instead of the relay's
	// amqp.exchange. It must be listed in the relay's amqp.exchanges, or the
	// relay parks the event dead (reason invalid) rather than publish it.
	Exchange string
}

// NewEvent returns an event of the given type with a fresh UUIDv7 id.
func NewEvent(eventType string, payload []byte) Event {
	return Event{ID: newID(), Type: eventType, Payload: payload, ContentType: ContentTypeJSON}
}

// NewJSONEvent marshals v to JSON and returns an event carrying it, with
// content type application/json and a fresh UUIDv7 id.
func NewJSONEvent(eventType string, v any) (Event, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return Event{}, fmt.Errorf("outbox: marshal %s payload: %w", eventType, err)
	}
	return NewEvent(eventType, b), nil
}

func newID() uuid.UUID {
	id, err := uuid.NewV7()
	if err != nil {
		// NewV7 fails only if the system's random source fails.
		return uuid.New()
	}
	return id
}

// ErrInvalidEvent is wrapped by every validation error from Validate and Write.
var ErrInvalidEvent = errors.New("outbox: invalid event")

// Validate reports the first problem that would make the event unpublishable.
func (e Event) Validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: "+format, append([]any{ErrInvalidEvent}, args...)...)
	}
	switch {
	case e.Type == "":
		return bad("Type is empty: set the event type, e.g. \"lesson.published\"")
	case len(e.Type) > 255:
		return bad("Type is %d bytes: AMQP routing keys hold at most 255", len(e.Type))
	case !utf8.ValidString(e.Type):
		return bad("Type %q is not valid UTF-8", e.Type)
	case e.Payload == nil:
		return bad("%s: Payload is nil: use []byte{} for an empty body", e.Type)
	case !utf8.ValidString(e.Key):
		return bad("%s: Key is not valid UTF-8", e.Type)
	case !utf8.ValidString(e.CorrelationID) || len(e.CorrelationID) > 255:
		return bad("%s: CorrelationID must be valid UTF-8 of at most 255 bytes", e.Type)
	case len(e.ContentType) > 255:
		return bad("%s: ContentType is longer than 255 bytes", e.Type)
	case len(e.RoutingKey) > 255 || !utf8.ValidString(e.RoutingKey):
		return bad("%s: RoutingKey must be valid UTF-8 of at most 255 bytes", e.Type)
	case len(e.Exchange) > 255 || !utf8.ValidString(e.Exchange):
		return bad("%s: Exchange must be valid UTF-8 of at most 255 bytes", e.Type)
	case containsNUL(e.Type) || containsNUL(e.Key) || containsNUL(e.CorrelationID) || containsNUL(e.ContentType) ||
		containsNUL(e.RoutingKey) || containsNUL(e.Exchange):
		return bad("%s: Type, Key, CorrelationID, ContentType, RoutingKey and Exchange cannot contain NUL bytes", e.Type)
	}
	for k, v := range e.Headers {
		switch {
		case k == "":
			return bad("%s: header with an empty name", e.Type)
		case len(k) > MaxHeaderNameLen:
			return bad("%s: header name %.20q... is longer than %d bytes", e.Type, k, MaxHeaderNameLen)
		case !utf8.ValidString(k) || !utf8.ValidString(v):
			return bad("%s: header %q: name and value must be valid UTF-8", e.Type, k)
		case containsNUL(k) || containsNUL(v):
			return bad("%s: header %q: NUL bytes cannot be stored in jsonb", e.Type, k)
		}
	}
	return nil
}

func containsNUL(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] == 0 {
			return true
		}
	}
	return false
}
