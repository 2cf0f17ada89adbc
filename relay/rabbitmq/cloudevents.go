package rabbitmq

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"maps"
	"math"
	"mime"
	"net/url"
	"slices"
	"strings"
	"time"
	"unicode/utf8"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/outbox-relay/outbox-relay/relay"
)

// CloudEvents 1.0 (https://github.com/cloudevents/spec): the AMQP binding's
// header prefix and the JSON event format's media type.
const (
	CloudEventsSpecVersion  = "1.0"
	CloudEventsHeaderPrefix = "cloudEvents:"
	ContentTypeCloudEvents  = "application/cloudevents+json"
)

// publishing is the AMQP message for m in the configured amqp.format. A row
// that cannot be a valid CloudEvent fails with reason invalid, named, rather
// than reach consumers that would reject it.
func (p *Publisher) publishing(m *relay.Message) (amqp.Publishing, error) {
	pub := toPublishing(m)
	if p.cfg.Format == relay.FormatPlain {
		return pub, nil
	}
	if err := cloudEventsValid(m); err != nil {
		return pub, &relay.PublishError{Reason: relay.ReasonInvalid, Err: fmt.Errorf("%w (amqp.format is %s)", err, p.cfg.Format)}
	}
	switch p.cfg.Format {
	case relay.FormatCloudEventsBinary:
		pub.Headers = cloudEventsHeaders(m, p.cfg.CloudEventsSource)
	case relay.FormatCloudEventsStructured:
		pub.Body = cloudEventsJSON(m, p.cfg.CloudEventsSource)
		pub.ContentType = ContentTypeCloudEvents
		pub.Headers = withoutExtensions(m.Headers)
	}
	pub.Headers = table(pub.Headers)
	return pub, nil
}

// cloudEventsValid checks what CloudEvents requires of the row's own
// values: a type that is not blank, and a content type that is an RFC 2046
// media type (or empty: datacontenttype is optional).
func cloudEventsValid(m *relay.Message) error {
	if strings.TrimSpace(m.Type) == "" {
		return fmt.Errorf("event_type %q is blank: CloudEvents requires a non-empty type", m.Type)
	}
	if m.ContentType != "" {
		// Go's parser takes a lone token ("json"); RFC 2046 wants type/subtype.
		if mt, _, err := mime.ParseMediaType(m.ContentType); err != nil || !strings.Contains(mt, "/") {
			return fmt.Errorf("content_type %q is not a media type such as application/json (RFC 2046), as CloudEvents requires of datacontenttype", m.ContentType)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(m.Headers)) {
		if err := extensionHeaderValid(name, m.Headers[name]); err != nil {
			return err
		}
	}
	return nil
}

// relayAttributes are the context attributes the relay sets from the row's
// columns and its config, and data, which is the payload: a row header may
// not set them, or it would contradict (or spoof) the relay's own.
var relayAttributes = map[string]bool{
	"specversion": true, "id": true, "source": true, "type": true, "time": true,
	"subject": true, "datacontenttype": true, "data": true,
}

// extensionHeaderValid checks a row header against the CloudEvents rules
// when its name claims to be an attribute: the binding's prefix
// (cloudEvents:, or cloudEvents_ for JMS, in any case) followed by a name
// of lowercase letters and digits that is not one the relay sets, with a
// string, boolean or 32-bit integer value (the CloudEvents types a header
// value can be). Other headers are not attributes and pass.
func extensionHeaderValid(header string, value any) error {
	if len(header) < len(CloudEventsHeaderPrefix) {
		return nil
	}
	prefix, name := header[:len(CloudEventsHeaderPrefix)], header[len(CloudEventsHeaderPrefix):]
	if !strings.EqualFold(prefix, CloudEventsHeaderPrefix) && !strings.EqualFold(prefix, "cloudEvents_") {
		return nil
	}
	fail := func(why string) error {
		return fmt.Errorf("header %q %s; rename or drop it", header, why)
	}
	switch {
	case prefix != CloudEventsHeaderPrefix:
		return fail("is a CloudEvents attribute header, which must start with exactly " + CloudEventsHeaderPrefix)
	case !attributeName(name):
		return fail("names no valid CloudEvents extension: names are lowercase letters and digits (a-z, 0-9)")
	case relayAttributes[name]:
		return fail("sets the context attribute " + name + ", which the relay sets from the row and amqp.cloudevents_source")
	case name == "dataschema":
		if s, _ := value.(string); !absoluteURI(s) {
			return fail("sets dataschema, which CloudEvents requires to be an absolute URI such as https://example.com/schemas/lesson.json")
		}
	}
	switch v := value.(type) {
	case string, bool:
	case int64:
		if v < math.MinInt32 || v > math.MaxInt32 {
			return fail("is outside the 32-bit range of a CloudEvents Integer")
		}
	default:
		return fail("is not a string, boolean or integer, the types a CloudEvents extension can have here")
	}
	return nil
}

func absoluteURI(s string) bool {
	u, err := url.Parse(s)
	return err == nil && u.IsAbs() && !strings.ContainsAny(s, " \t\r\n")
}

// attributeName reports whether s is a CloudEvents attribute name: one or
// more lowercase ASCII letters and digits.
func attributeName(s string) bool {
	if s == "" {
		return false
	}
	for _, c := range []byte(s) {
		if (c < 'a' || c > 'z') && (c < '0' || c > '9') {
			return false
		}
	}
	return true
}

// extensions returns m's cloudEvents:* headers (already valid) by attribute
// name, sorted, so the structured document is deterministic.
func extensions(h map[string]any) []string {
	var names []string
	for k := range h {
		if name, ok := strings.CutPrefix(k, CloudEventsHeaderPrefix); ok {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	return names
}

// withoutExtensions returns h without its cloudEvents:* headers: in
// structured mode they are attributes inside the document, and a header
// beside it would be a second, possibly different, copy.
func withoutExtensions(h map[string]any) amqp.Table {
	out := make(amqp.Table, len(h))
	for k, v := range h {
		if !strings.HasPrefix(k, CloudEventsHeaderPrefix) {
			out[k] = v
		}
	}
	return out
}

// subject is the CloudEvents subject of m: its partition key, unless blank
// (subject must not be).
func subject(m *relay.Message) string {
	if strings.TrimSpace(m.Key) == "" {
		return ""
	}
	return m.Key
}

// cloudEventsHeaders returns m's headers with the CloudEvents attributes
// added under the AMQP binding's names; datacontenttype is the content-type
// property already. The time is a string: AMQP 0-9-1 timestamps hold whole
// seconds, and the binding allows the canonical string form. The row's
// cloudEvents:* headers, checked by cloudEventsValid, are extensions.
func cloudEventsHeaders(m *relay.Message, source string) amqp.Table {
	h := make(amqp.Table, len(m.Headers)+6)
	maps.Copy(h, m.Headers)
	h[CloudEventsHeaderPrefix+"specversion"] = CloudEventsSpecVersion
	h[CloudEventsHeaderPrefix+"id"] = m.ID.String()
	h[CloudEventsHeaderPrefix+"source"] = source
	h[CloudEventsHeaderPrefix+"type"] = m.Type
	h[CloudEventsHeaderPrefix+"time"] = m.CreatedAt.UTC().Format(time.RFC3339Nano)
	if sub := subject(m); sub != "" {
		h[CloudEventsHeaderPrefix+"subject"] = sub
	}
	return h
}

// cloudEventsJSON renders m in the CloudEvents JSON format. A valid JSON
// payload of a JSON content type is embedded as it is, byte for byte, as
// data; any other payload is data_base64 (the relay holds bytes, which the
// format encodes so); an empty one has no data. The payload is written
// straight into the buffer, grown once to fit it after the attributes: a
// large payload costs the document and nothing more (an encoded string,
// then its quoted copy, would each be as large again).
func cloudEventsJSON(m *relay.Message, source string) []byte {
	var b bytes.Buffer
	b.Grow(256)
	attr := func(name string, value any) {
		if b.Len() == 0 {
			b.WriteByte('{')
		} else {
			b.WriteByte(',')
		}
		b.WriteString(`"` + name + `":`)
		v, _ := json.Marshal(value) // a string, bool or int64 cannot fail
		b.Write(v)
	}
	attr("specversion", CloudEventsSpecVersion)
	attr("id", m.ID.String())
	attr("source", source)
	attr("type", m.Type)
	attr("time", m.CreatedAt.UTC().Format(time.RFC3339Nano))
	if sub := subject(m); sub != "" {
		attr("subject", sub)
	}
	if m.ContentType != "" {
		attr("datacontenttype", m.ContentType)
	}
	for _, name := range extensions(m.Headers) {
		attr(name, m.Headers[CloudEventsHeaderPrefix+name])
	}
	switch {
	case len(m.Body) == 0:
	case jsonMediaType(m.ContentType) && json.Valid(m.Body) && utf8.Valid(m.Body): // JSON text is UTF-8 (RFC 8259)
		b.Grow(len(m.Body) + 16)
		b.WriteString(`,"data":`)
		b.Write(m.Body)
	default:
		// The base64 alphabet needs no escaping in a JSON string.
		b.Grow(base64.StdEncoding.EncodedLen(len(m.Body)) + 32)
		b.WriteString(`,"data_base64":"`)
		enc := base64.NewEncoder(base64.StdEncoding, &b)
		enc.Write(m.Body) // writes to a bytes.Buffer cannot fail
		enc.Close()
		b.WriteByte('"')
	}
	b.WriteByte('}')
	return b.Bytes()
}

// jsonMediaType reports whether a content type is JSON that consumers
// decode as a JSON data member: application/json or text/json, in lower
// case, parameters aside. The spec counts */*+json and any letter case too,
// but the CloudEvents Go SDK (v2.16) then expects a string and fails;
// data_base64 is valid for any payload.
func jsonMediaType(contentType string) bool {
	mt, _, err := mime.ParseMediaType(contentType)
	if err != nil {
		return false
	}
	written, _, _ := strings.Cut(contentType, ";")
	return (mt == "application/json" || mt == "text/json") && strings.TrimSpace(written) == mt
}
