package outbox_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/outbox-relay/outbox-relay/outbox"
)

func TestValidate(t *testing.T) {
	t.Parallel()
	ok := outbox.NewEvent("lesson.published", []byte(`{}`))
	if err := ok.Validate(); err != nil {
		t.Fatalf("valid event rejected: %v", err)
	}
	cases := map[string]func(*outbox.Event){
		"empty type":         func(e *outbox.Event) { e.Type = "" },
		"type too long":      func(e *outbox.Event) { e.Type = strings.Repeat("x", 256) },
		"type not utf8":      func(e *outbox.Event) { e.Type = "\xff" },
		"nil payload":        func(e *outbox.Event) { e.Payload = nil },
		"empty header name":  func(e *outbox.Event) { e.Headers = map[string]string{"": "v"} },
		"long header name":   func(e *outbox.Event) { e.Headers = map[string]string{strings.Repeat("h", 256): "v"} },
		"header value utf8":  func(e *outbox.Event) { e.Headers = map[string]string{"h": "\xc3\x28"} },
		"header NUL":         func(e *outbox.Event) { e.Headers = map[string]string{"h": "a\x00b"} },
		"key NUL":            func(e *outbox.Event) { e.Key = "a\x00" },
		"correlation length": func(e *outbox.Event) { e.CorrelationID = strings.Repeat("c", 256) },
		"routing key length": func(e *outbox.Event) { e.RoutingKey = strings.Repeat("r", 256) },
		"routing key NUL":    func(e *outbox.Event) { e.RoutingKey = "a\x00" },
		"exchange length":    func(e *outbox.Event) { e.Exchange = strings.Repeat("x", 256) },
		"exchange not utf8":  func(e *outbox.Event) { e.Exchange = "\xff" },
	}
	for name, mutate := range cases {
		e := outbox.NewEvent("lesson.published", []byte(`{}`))
		mutate(&e)
		if err := e.Validate(); !errors.Is(err, outbox.ErrInvalidEvent) {
			t.Errorf("%s: Validate() = %v, want ErrInvalidEvent", name, err)
		}
	}
}

// refuseTx fails the test if the helper talks to the database at all.
type refuseTx struct{ t *testing.T }

func (r refuseTx) Exec(context.Context, string, ...any) (pgconn.CommandTag, error) {
	r.t.Fatal("Write sent a statement although an event was invalid")
	return pgconn.CommandTag{}, nil
}

func TestWriteRejectsBeforeTouchingDatabase(t *testing.T) {
	t.Parallel()
	good := outbox.NewEvent("a", []byte{})
	bad := outbox.Event{Type: "b"} // nil payload
	err := outbox.Write(context.Background(), refuseTx{t}, good, bad)
	if !errors.Is(err, outbox.ErrInvalidEvent) || !strings.Contains(err.Error(), "event 1") {
		t.Fatalf("Write = %v, want ErrInvalidEvent naming event 1", err)
	}
}

func TestWriteNothing(t *testing.T) {
	t.Parallel()
	if err := outbox.Write(context.Background(), refuseTx{t}); err != nil {
		t.Fatal(err)
	}
}

func TestNewJSONEvent(t *testing.T) {
	t.Parallel()
	e, err := outbox.NewJSONEvent("badge.awarded", map[string]int{"points": 3})
	if err != nil {
		t.Fatal(err)
	}
	if string(e.Payload) != `{"points":3}` || e.ContentType != outbox.ContentTypeJSON || e.ID.Version() != 7 {
		t.Fatalf("got payload %s, content type %q, id version %d", e.Payload, e.ContentType, e.ID.Version())
	}
	if _, err := outbox.NewJSONEvent("x", make(chan int)); err == nil {
		t.Fatal("unmarshalable value accepted")
	}
}

func TestNewWriterRejectsBadIdentifiers(t *testing.T) {
	t.Parallel()
	if _, err := outbox.NewWriter("public", `outbox"; DROP TABLE x; --`); err == nil {
		t.Fatal("bad table name accepted")
	}
}

func TestTraceparentValidation(t *testing.T) {
	t.Parallel()
	for tp, ok := range map[string]bool{
		"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01": true,
		"00-00000000000000000000000000000000-00f067aa0ba902b7-01": false,
		"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01": false,
		"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01": false,
		"garbage": false,
		"":        false,
	} {
		if outbox.ValidTraceparent(tp) != ok {
			t.Errorf("ValidTraceparent(%q) = %v", tp, !ok)
		}
		ctx := outbox.ContextWithTraceparent(context.Background(), tp)
		if _, stored := outbox.TraceparentFromContext(ctx); stored != ok {
			t.Errorf("%q stored = %v", tp, stored)
		}
	}
}
