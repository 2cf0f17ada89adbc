package rabbitmq_test

import (
	"bytes"
	"encoding/json"
	"reflect"
	"strconv"
	"strings"
	"testing"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/relay/rabbitmq"
)

// FuzzDecodeHeaders: the headers column is written by anyone who can
// INSERT, so DecodeHeaders must never panic; whatever it accepts must be a
// field table the broker link can send once the publisher has made it one
// (rabbitmq's table; amqp.Table.Validate checks the
// value types; the wire format also needs every field name, at any depth,
// to fit a short string of 255 bytes, which Validate does not check, and
// a name that does not fit fails the publish as a lost connection); it must
// keep the values of the JSON it accepts; and it must accept every JSON
// object whose names all fit, or valid rows would be parked dead.
//
// The seeds are the shapes the relay meets: the column's default, what
// outbox.Write stores (string values), what PostgreSQL's jsonb output looks
// like (spaces after ':' and ','), and the edges of the decoding.
func FuzzDecodeHeaders(f *testing.F) {
	long := strings.Repeat("h", 256)
	for _, seed := range []string{
		``,
		`{}`,
		`{"origin": "txn-3", "schema-version": "2"}`,
		`{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}`,
		`{"a": 1, "b": -2.5, "c": true, "d": null, "e": "✓ ünïcode", "f": [1, "x", false, null, {"g": 3}]}`,
		`{"nested": {"deeper": {"deepest": [[], {}, [1e3, 1E-3]]}}}`,
		`{"max": 9223372036854775807, "min": -9223372036854775808, "above": 9223372036854775808}`,
		`{"big": 1e400, "tiny": 1e-400, "neg0": -0, "frac": 1.0}`,
		`{"dup": 1, "dup": 2}`,
		`{"esc": "\u0000\ud83d\ude00\"\\\n"}`,
		`{"` + strings.Repeat("h", 255) + `": 1}`,
		// Names too long for AMQP must be rejected at every depth: the
		// publish cannot encode them.
		`{"` + long + `": 1}`,
		`{"outer": {"` + long + `": 1}}`,
		`{"list": [{"` + long + `": 1}]}`,
		`[]`, `"headers"`, `42`, `null`, `{`, `{"a": }`, `{"a": 1} x`, `{"a": 1}{"b": 2}`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		h, err := relay.DecodeHeaders(raw)
		if err != nil {
			if h != nil {
				t.Fatalf("DecodeHeaders(%q) returned headers %v with error %v", raw, h, err)
			}
			if isObject(raw) && namesFit(t, raw) {
				t.Fatalf("DecodeHeaders rejected a JSON object whose every name fits a short string: %q: %v", raw, err)
			}
			return
		}
		if err := rabbitmq.Table(h).Validate(); err != nil {
			t.Fatalf("DecodeHeaders(%q) = %#v, not a valid amqp.Table: %v", raw, h, err)
		}
		checkField(t, raw, "headers", map[string]any(h))
		// The values are the JSON's (numbers compared as float64, which is
		// how encoding/json reads them).
		var want any
		if json.Unmarshal(raw, &want) == nil {
			if m, ok := want.(map[string]any); ok && len(m) == 0 {
				want = nil // {} decodes to no headers
			}
			var got any
			if h != nil {
				got = asJSON(map[string]any(h))
			}
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("DecodeHeaders(%q) = %#v; the JSON says %#v", raw, got, want)
			}
		}
	})
}

// checkField fails unless v is one of the types DecodeHeaders documents
// (string, bool, int64, float64, nil, nested tables, arrays) with every
// field name of at most 255 bytes.
func checkField(t *testing.T, raw []byte, path string, v any) {
	t.Helper()
	switch x := v.(type) {
	case nil, string, bool, int64, float64:
	case map[string]any:
		checkTable(t, raw, path, x)
	case amqp.Table:
		checkTable(t, raw, path, x)
	case []any:
		for i, e := range x {
			checkField(t, raw, path+"["+strconv.Itoa(i)+"]", e)
		}
	default:
		t.Fatalf("DecodeHeaders(%q): %s is a %T, not a documented header type", raw, path, v)
	}
}

func checkTable(t *testing.T, raw []byte, path string, m map[string]any) {
	t.Helper()
	for k, e := range m {
		if len(k) > 255 {
			t.Fatalf("DecodeHeaders accepted a field name of %d bytes at %s (AMQP allows 255; publishing it fails the link): input %.120q...", len(k), path, raw)
		}
		checkField(t, raw, path+"."+k[:min(len(k), 20)], e)
	}
}

// asJSON converts decoded headers to what encoding/json would produce.
func asJSON(v any) any {
	switch x := v.(type) {
	case int64:
		return float64(x)
	case map[string]any:
		out := make(map[string]any, len(x))
		for k, e := range x {
			out[k] = asJSON(e)
		}
		return out
	case amqp.Table:
		return asJSON(map[string]any(x))
	case []any:
		out := make([]any, len(x))
		for i, e := range x {
			out[i] = asJSON(e)
		}
		return out
	default:
		return v
	}
}

// isObject reports whether raw is exactly one valid JSON object.
func isObject(raw []byte) bool {
	return json.Valid(raw) && bytes.HasPrefix(bytes.TrimLeft(raw, " \t\r\n"), []byte("{"))
}

// namesFit reports whether every field name in the JSON raw, at any depth,
// is at most 255 bytes.
func namesFit(t *testing.T, raw []byte) bool {
	t.Helper()
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber() // numbers out of float64's range are still JSON
	var v any
	if err := dec.Decode(&v); err != nil {
		t.Fatalf("valid JSON %q does not decode: %v", raw, err)
	}
	var fit func(any) bool
	fit = func(v any) bool {
		switch x := v.(type) {
		case map[string]any:
			for k, e := range x {
				if len(k) > 255 || !fit(e) {
					return false
				}
			}
		case []any:
			for _, e := range x {
				if !fit(e) {
					return false
				}
			}
		}
		return true
	}
	return fit(v)
}
