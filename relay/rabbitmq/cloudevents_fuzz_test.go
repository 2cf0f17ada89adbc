package rabbitmq_test

import (
	"bytes"
	"encoding/json"
	"net/url"
	"runtime"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	ce "github.com/cloudevents/sdk-go/v2/event"
	"github.com/google/uuid"

	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/relay/rabbitmq"
)

// FuzzCloudEventsJSON: whatever a row holds, the structured document is
// valid UTF-8 JSON that the CloudEvents Go SDK decodes and validates, with
// the payload back as data (byte for byte when it went as data_base64) and
// a cloudEvents:<ext> row header as an extension, or the row is refused (a
// blank type, a content type that is no media type, a header that is no
// valid extension).
func FuzzCloudEventsJSON(f *testing.F) {
	f.Add([]byte(`{"a": 1}`), "application/json", "lesson.published", "k", "tenant", "t7")
	f.Add([]byte("{\"s\":\"\xff\"}"), "application/json", "t", "", "", "") // JSON-looking, not UTF-8
	f.Add([]byte(`null`), "text/json; charset=utf-8", "t", "", "id", "spoofed")
	f.Add([]byte{0, 1, 2}, "application/octet-stream", "t", "k\"<>", "Tenant", "x")
	f.Add([]byte(`[1]`), "application/vnd.x+json", "t", "", "dataschema", "https://example.com/s.json")
	f.Add([]byte{}, "", "t", "", "data", "x")
	f.Fuzz(func(t *testing.T, payload []byte, contentType, eventType, key, ext, extValue string) {
		if eventType == "" || !utf8.ValidString(eventType) || !utf8.ValidString(key) || !utf8.ValidString(contentType) ||
			!utf8.ValidString(ext) || !utf8.ValidString(extValue) {
			t.Skip("event_type, partition_key, content_type and jsonb headers are PostgreSQL text: valid UTF-8")
		}
		m := relay.Message{ID: uuid.New(), Type: eventType, Key: key, Body: payload, ContentType: contentType,
			CreatedAt: time.Date(2026, 12, 7, 10, 2, 14, 459939000, time.UTC)}
		if ext != "" {
			m.Headers = map[string]any{rabbitmq.CloudEventsHeaderPrefix + ext: extValue}
		}
		doc, err := rabbitmq.CloudEventsJSON(&m, "//edupulse/lessons")
		if err != nil {
			t.Skip("parked dead as invalid, not published:", err)
		}
		if !utf8.Valid(doc) || !json.Valid(doc) {
			t.Fatalf("not UTF-8 JSON: %q", doc)
		}
		e := ce.New()
		if err := json.Unmarshal(doc, &e); err != nil {
			t.Fatalf("SDK cannot decode %s: %v", doc, err)
		}
		if err := e.Validate(); err != nil {
			t.Fatalf("SDK finds %s invalid: %v", doc, err)
		}
		if e.ID() != m.ID.String() || e.Type() != eventType || (e.Subject() != key && strings.TrimSpace(key) != "") {
			t.Fatalf("attributes lost: %s", doc)
		}
		var raw map[string]json.RawMessage
		_ = json.Unmarshal(doc, &raw)
		if _, b64 := raw["data_base64"]; b64 && !bytes.Equal(e.Data(), payload) {
			t.Fatalf("data_base64 decodes to %q, want %q", e.Data(), payload)
		}
		if _, data := raw["data"]; data && !bytes.Equal(bytes.TrimSpace(raw["data"]), bytes.TrimSpace(payload)) {
			t.Fatalf("data %s, want the payload %s", raw["data"], payload)
		}
		if len(payload) > 0 && raw["data"] == nil && raw["data_base64"] == nil {
			t.Fatalf("payload lost: %s", doc)
		}
		if ext == "dataschema" {
			if u, err := url.Parse(extValue); err != nil || e.DataSchema() != u.String() { // the SDK lowercases the scheme
				t.Fatalf("dataschema %q, want %q: %s", e.DataSchema(), extValue, doc)
			}
		} else if ext != "" && e.Extensions()[ext] != extValue {
			t.Fatalf("extension %s = %v, want %q: %s", ext, e.Extensions()[ext], extValue, doc)
		}
	})
}

// TestStructuredLargePayloadCostsOneDocument: a large binary payload in
// structured mode allocates its document once, not the encoded payload
// again as a string and as that string's quoted copy (three times the
// document, which a relay near its container limit cannot afford). Not
// parallel: it reads the process's allocation counter.
func TestStructuredLargePayloadCostsOneDocument(t *testing.T) {
	for _, tc := range []struct {
		contentType string
		payload     []byte
	}{
		{"application/octet-stream", bytes.Repeat([]byte{0, 1, 2, 0xff}, 2<<20)},   // data_base64
		{"application/json", []byte(`{"p":"` + strings.Repeat("x", 8<<20) + `"}`)}, // data, as it is
	} {
		m := relay.Message{ID: uuid.New(), Type: "lesson.recorded", Body: tc.payload, ContentType: tc.contentType,
			Headers: map[string]any{rabbitmq.CloudEventsHeaderPrefix + "tenant": strings.Repeat("t", 600)}, CreatedAt: time.Now()}
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		doc, err := rabbitmq.CloudEventsJSON(&m, "//edupulse/lessons")
		runtime.ReadMemStats(&after)
		if err != nil {
			t.Fatal(err)
		}
		if alloc := after.TotalAlloc - before.TotalAlloc; alloc > uint64(len(doc))*5/4 {
			t.Errorf("%s: %d bytes allocated for a %d-byte document, want at most 1.25 times the document", tc.contentType, alloc, len(doc))
		}
		e := ce.New()
		if err := json.Unmarshal(doc, &e); err != nil || !bytes.Equal(bytes.TrimSpace(e.Data()), tc.payload) {
			t.Errorf("%s: the SDK does not read the payload back (%v)", tc.contentType, err)
		}
	}
}
