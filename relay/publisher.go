package relay

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgtype"
)

// Message is one outbox row on its way to the broker.
type Message struct {
	Seq           int64
	ID            uuid.UUID
	Type          string
	Key           string
	Body          []byte
	ContentType   string
	CorrelationID string
	Headers       map[string]any
	CreatedAt     time.Time
	Attempts      int
	// RoutingKey and Exchange are the row's overrides; empty means the
	// defaults, Type and amqp.exchange.
	RoutingKey string
	Exchange   string
	// tid is the row's ctid as its claim locked it: settling marks the
	// row by it (see claimColumns).
	tid pgtype.TID
}

// Publisher is what the relay needs from a broker: send a batch with all
// confirms outstanding together, and later collect the outcome per message.
// The relay keeps up to Config.PendingBatches batches sent and not yet
// waited for: it sends the next while earlier ones' confirms arrive. The
// AMQP implementation is package relay/rabbitmq; relay/relaytest has a fake
// and the conformance suite every implementation must pass.
type Publisher interface {
	// Send publishes msgs without waiting for confirms. Calls are made from
	// one goroutine; batches are waited for in the order they were sent.
	Send(ctx context.Context, msgs []Message) Pending
	// Connect establishes the broker link if it is down; idempotent.
	Connect(ctx context.Context) error
	// Ready reports whether the broker link is up (nil) or why not.
	Ready() error
	// Close releases the broker connection; it may be called more than
	// once, and Ready reports an error after it.
	Close() error
}

// Pending is a sent batch.
type Pending interface {
	// Wait returns one error per message, in order: nil means the broker
	// confirmed that exact message; otherwise a *PublishError. It returns
	// when every message is settled, the confirm timeout passed, or ctx is done.
	Wait(ctx context.Context) []error
}

// Reason classifies a publish failure. The values are metric label values.
type Reason string

// The reasons a publish can fail.
const (
	ReasonNack       Reason = "nack"       // broker refused the message (basic.nack)
	ReasonUnroutable Reason = "unroutable" // returned: no queue bound for the routing key
	ReasonTimeout    Reason = "timeout"    // no confirm within amqp.confirm_timeout
	ReasonConnection Reason = "connection" // connection or channel lost before the confirm
	ReasonTooLarge   Reason = "too_large"  // larger than amqp.max_message_size
	ReasonInvalid    Reason = "invalid"    // the row cannot be turned into a message (bad headers)
)

// PublishError is a failed publish with its reason.
type PublishError struct {
	Reason Reason
	Err    error
	// Accepted marks a return the configuration accepts (amqp.unroutable:
	// accept): the event counts as delivered, and is only counted.
	Accepted bool
	// Deferred marks a message that was not sent, or not confirmed, because
	// the broker closed the channel over another message, or not sent
	// because Send's ctx ended: the link is fine and the message is retried
	// as it is (Reason is connection).
	Deferred bool
}

// Error is the reason, then the cause.
func (e *PublishError) Error() string {
	if e.Err == nil {
		return string(e.Reason)
	}
	return string(e.Reason) + ": " + e.Err.Error()
}

// Unwrap returns the cause, for errors.Is and errors.As.
func (e *PublishError) Unwrap() error { return e.Err }

// Transient reports whether the failure says nothing about the message
// itself (the link dropped): the row is retried without charging an attempt.
func (e *PublishError) Transient() bool { return e.Reason == ReasonConnection }

// Permanent reports whether retrying cannot help: the row is parked dead at once.
func (e *PublishError) Permanent() bool {
	return e.Reason == ReasonTooLarge || e.Reason == ReasonInvalid
}

// accepted reports a return that amqp.unroutable: accept counts as delivered.
func accepted(err error) bool {
	var pe *PublishError
	return errors.As(err, &pe) && pe.Accepted
}

// reasonOf extracts the reason of a publish error (connection when unknown).
func reasonOf(err error) *PublishError {
	var pe *PublishError
	if errors.As(err, &pe) {
		return pe
	}
	return &PublishError{Reason: ReasonConnection, Err: err}
}

// DecodeHeaders turns the row's jsonb headers into the values an AMQP field
// table can hold: strings, booleans, nil, int64 for integral numbers,
// float64 otherwise, nested objects (map[string]any) and arrays ([]any).
// Every name, at any depth, fits an AMQP short string. The input must be a
// JSON object.
func DecodeHeaders(raw []byte) (map[string]any, error) {
	if len(raw) == 0 || string(raw) == "{}" { // the common case, without a decoder
		return nil, nil
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var obj map[string]any
	err := dec.Decode(&obj)
	if err != nil {
		return nil, fmt.Errorf("headers must be a JSON object: %w", err)
	}
	if dec.More() {
		return nil, errors.New("headers: trailing data after the JSON object")
	}
	if len(obj) == 0 {
		return nil, nil
	}
	for k, v := range obj {
		if obj[k], err = headerValue(k, v); err != nil {
			return nil, err
		}
	}
	return obj, nil
}

// maxShortString is the longest AMQP short string (field names, and the
// content-type, correlation-id and type properties): an over-long one cannot
// be encoded, and amqp091-go closes the connection over it.
const maxShortString = 255

// headerValue converts a decoded JSON value of header name to its field
// form, checking the names of nested objects at every depth.
func headerValue(name string, v any) (any, error) {
	if len(name) > maxShortString {
		return nil, fmt.Errorf("header name %.20q... is longer than %d bytes", name, maxShortString)
	}
	switch x := v.(type) {
	case json.Number:
		if i, err := x.Int64(); err == nil {
			return i, nil
		}
		f, _ := x.Float64()
		return f, nil
	case map[string]any:
		t := make(map[string]any, len(x))
		for k, e := range x {
			var err error
			if t[k], err = headerValue(k, e); err != nil {
				return nil, err
			}
		}
		return t, nil
	case []any:
		for i, e := range x {
			var err error
			if x[i], err = headerValue("", e); err != nil {
				return nil, err
			}
		}
		return x, nil
	default: // string, bool, nil
		return v, nil
	}
}
