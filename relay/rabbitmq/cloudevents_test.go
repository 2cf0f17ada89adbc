package rabbitmq_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"regexp"
	"strings"
	"testing"
	"time"

	ce "github.com/cloudevents/sdk-go/v2/event"
	"github.com/jackc/pgx/v5"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/relay/rabbitmq"
)

const ceSource = "//edupulse/lessons"

// ceAttrName is the CloudEvents 1.0 rule for attribute names: lowercase
// letters and digits.
var ceAttrName = regexp.MustCompile(`^[a-z0-9]+$`)

// checkSpec checks CloudEvents 1.0 attributes as the spec states them,
// independently of any SDK: the four required ones present and non-empty
// strings, specversion 1.0, source a URI-reference, time RFC 3339, names
// lowercase alphanumerics.
func checkSpec(t *testing.T, where string, attrs map[string]any) {
	t.Helper()
	for _, req := range []string{"id", "source", "specversion", "type"} {
		if s, ok := attrs[req].(string); !ok || s == "" {
			t.Errorf("%s: required attribute %s is %v, want a non-empty string", where, req, attrs[req])
		}
	}
	if attrs["specversion"] != "1.0" {
		t.Errorf("%s: specversion %v, want 1.0", where, attrs["specversion"])
	}
	if s, _ := attrs["source"].(string); s != "" {
		if _, err := url.Parse(s); err != nil {
			t.Errorf("%s: source %q is not a URI-reference: %v", where, s, err)
		}
	}
	if tm, ok := attrs["time"]; ok {
		if s, _ := tm.(string); s == "" {
			t.Errorf("%s: time %v is not a string", where, tm)
		} else if _, err := time.Parse(time.RFC3339, s); err != nil {
			t.Errorf("%s: time %q is not RFC 3339: %v", where, s, err)
		}
	}
	for _, opt := range []string{"subject", "datacontenttype"} {
		if v, ok := attrs[opt]; ok {
			if s, _ := v.(string); s == "" {
				t.Errorf("%s: %s %v, want a non-empty string when present", where, opt, v)
			}
		}
	}
	for name := range attrs {
		if name != "data" && name != "data_base64" && !ceAttrName.MatchString(name) {
			t.Errorf("%s: attribute name %q is not lowercase alphanumeric", where, name)
		}
	}
}

// badHeaderRows are rows whose headers contradict the relay's attributes
// or break the CloudEvents naming rules, each with the start of the
// last_error it must be parked dead with.
var badHeaderRows = []struct{ headers, lastError string }{
	{`{"cloudEvents:datacontenttype": "text/plain"}`, `invalid: header "cloudEvents:datacontenttype" sets the context attribute datacontenttype`},
	{`{"cloudEvents:id": "spoofed"}`, `invalid: header "cloudEvents:id" sets the context attribute id`},
	{`{"cloudEvents:specversion": "0.3"}`, `invalid: header "cloudEvents:specversion" sets the context attribute specversion`},
	{`{"cloudEvents:Tenant": "t7"}`, `invalid: header "cloudEvents:Tenant" names no valid CloudEvents extension: names are lowercase letters and digits`},
	{`{"cloudevents:tenant": "t7"}`, `invalid: header "cloudevents:tenant" is a CloudEvents attribute header, which must start with exactly cloudEvents:`},
	{`{"cloudEvents:tenant": {"a": 1}}`, `invalid: header "cloudEvents:tenant" is not a string, boolean or integer`},
	{`{"cloudEvents:dataschema": "lesson.json"}`, `invalid: header "cloudEvents:dataschema" sets dataschema, which CloudEvents requires to be an absolute URI`},
}

// insertBadHeaderRows writes badHeaderRows as event type bad.header.N.
func insertBadHeaderRows(t *testing.T, o *testenv.Outbox) {
	t.Helper()
	for i, r := range badHeaderRows {
		if _, err := o.Pool.Exec(context.Background(), `INSERT INTO `+o.Table.Quoted()+` (event_type, payload, headers) VALUES ($1, '{}', $2)`,
			fmt.Sprintf("bad.header.%d", i), r.headers); err != nil {
			t.Fatal(err)
		}
	}
}

// awaitBadHeaderRowsDead waits for every bad header row to be parked dead,
// its last_error naming the header and the rule.
func awaitBadHeaderRowsDead(t *testing.T, o *testenv.Outbox) {
	t.Helper()
	for i, r := range badHeaderRows {
		testenv.Eventually(t, 10*time.Second, "row with headers "+r.headers+" parked dead, named", func() bool {
			return o.Count(t, `event_type = $1 AND dead_at IS NOT NULL AND starts_with(last_error, $2)`, fmt.Sprintf("bad.header.%d", i), r.lastError) == 1
		})
	}
}

// createdAt reads the row's created_at, the event's time.
func createdAt(t *testing.T, o *testenv.Outbox, id string) time.Time {
	t.Helper()
	var at time.Time
	if err := o.Pool.QueryRow(context.Background(), `SELECT created_at FROM `+o.Rows()+` o WHERE id = $1`, id).Scan(&at); err != nil {
		t.Fatal(err)
	}
	return at
}

// TestCloudEventsBinary: with amqp.format cloudevents-binary the payload is
// the body byte for byte, datacontenttype is the content-type property, and
// the attributes are cloudEvents:* headers as the CloudEvents AMQP binding
// names them; subject is the partition key, when there is one. Row headers
// stay, and a cloudEvents:* row header is an extension attribute. A row
// whose content_type is no media type, or whose cloudEvents:* header sets a
// relay attribute or is no valid extension, is parked dead, not published.
func TestCloudEventsBinary(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	deliveries := b.Consume(t, b.Queue(t, "#", nil))
	cfg := testenv.RelayConfig(o, b)
	cfg.AMQP.Format, cfg.AMQP.CloudEventsSource = relay.FormatCloudEventsBinary, ceSource
	testenv.StartRelay(t, cfg)
	w, _ := outbox.NewWriter(o.Schema, o.Table.Name)
	ctx := context.Background()
	keyed := outbox.NewEvent("lesson.published", []byte(` {"lesson": "l1"} `))
	keyed.Key = "lesson-1"
	keyed.Headers = map[string]string{"schema-version": "2", "cloudEvents:tenant": "t7"}
	unkeyed := outbox.NewEvent("quiz.submitted", []byte{0, 1, 2, 0xff})
	unkeyed.ContentType = "application/octet-stream"
	if err := pgx.BeginFunc(ctx, o.Pool, func(tx pgx.Tx) error { return w.Write(ctx, tx, keyed, unkeyed) }); err != nil {
		t.Fatal(err)
	}
	// A row that cannot be a CloudEvent is parked, named, not published.
	if _, err := o.Pool.Exec(ctx, `INSERT INTO `+o.Table.Quoted()+` (event_type, payload, content_type) VALUES ('bad.type', '{}', 'json')`); err != nil {
		t.Fatal(err)
	}
	insertBadHeaderRows(t, o)
	for _, d := range testenv.Receive(t, deliveries, 2, 20*time.Second) {
		ev := keyed
		if d.MessageId == unkeyed.ID.String() {
			ev = unkeyed
		}
		attrs := map[string]any{}
		for k, v := range d.Headers {
			if name, ok := bytes.CutPrefix([]byte(k), []byte("cloudEvents:")); ok {
				attrs[string(name)] = v
			}
		}
		if d.ContentType != "" {
			attrs["datacontenttype"] = d.ContentType
		}
		checkSpec(t, ev.Type, attrs)
		if !bytes.Equal(d.Body, ev.Payload) || d.ContentType != ev.ContentType {
			t.Errorf("%s: body %q content-type %q, want the payload %q and %q", ev.Type, d.Body, d.ContentType, ev.Payload, ev.ContentType)
		}
		at, err := time.Parse(time.RFC3339Nano, attrs["time"].(string))
		if err != nil || !at.Equal(createdAt(t, o, ev.ID.String())) {
			t.Errorf("%s: time %v (%v), want the row's created_at", ev.Type, attrs["time"], err)
		}
		want := map[string]any{"id": ev.ID.String(), "type": ev.Type, "source": ceSource, "specversion": "1.0"}
		if ev.Key != "" {
			want["subject"] = ev.Key
			want["tenant"] = "t7"
		} else if _, ok := attrs["subject"]; ok {
			t.Errorf("%s: subject %v without a partition key", ev.Type, attrs["subject"])
		}
		for k, v := range want {
			if attrs[k] != v {
				t.Errorf("%s: cloudEvents:%s = %v, want %v", ev.Type, k, attrs[k], v)
			}
		}
		if ev.Key != "" && d.Headers["schema-version"] != "2" {
			t.Errorf("%s: row header schema-version lost: %v", ev.Type, d.Headers)
		}
	}
	testenv.Eventually(t, 10*time.Second, "the row whose content_type is no media type parked dead, named", func() bool {
		return o.Count(t, `event_type = 'bad.type' AND dead_at IS NOT NULL AND last_error LIKE 'invalid: content_type "json" is not a media type%'`) == 1
	})
	awaitBadHeaderRowsDead(t, o)
}

// TestCloudEventsStructured: with amqp.format cloudevents-structured each
// message is an application/cloudevents+json document that the CloudEvents
// Go SDK decodes and validates, with every required attribute as the spec
// states it; a JSON payload of a JSON content type is embedded byte for
// byte as data, any other as data_base64, and an empty one has no data.
// A row's cloudEvents:<ext> headers are extension attributes inside the
// document, not AMQP headers beside it; one that sets a relay attribute or
// is no valid extension parks the row dead.
func TestCloudEventsStructured(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	deliveries := b.Consume(t, b.Queue(t, "#", nil))
	cfg := testenv.RelayConfig(o, b)
	cfg.AMQP.Format, cfg.AMQP.CloudEventsSource = relay.FormatCloudEventsStructured, ceSource
	testenv.StartRelay(t, cfg)
	w, _ := outbox.NewWriter(o.Schema, o.Table.Name)
	ctx := context.Background()
	jsonEv := outbox.NewEvent("lesson.published", []byte("{\"title\": \"<b>Fractions & ratios</b>\",\n \"n\": 1.50}"))
	jsonEv.Key = "lesson-1"
	jsonEv.Headers = map[string]string{"schema-version": "2", "cloudEvents:tenant": "t7", "cloudEvents:dataschema": "https://edupulse.example/lesson.json"}
	charset := outbox.NewEvent("quiz.submitted", []byte(`[1,2,3]`))
	charset.ContentType = "application/json; charset=utf-8"
	vendor := outbox.NewEvent("quiz.graded", []byte(`{"score":9}`)) // +json: base64, which every SDK decodes
	vendor.ContentType = "application/vnd.edupulse.quiz+json"
	binary := outbox.NewEvent("badge.image", []byte{0, 1, 2, 0xff, '{'})
	binary.ContentType = "image/png"
	notJSON := outbox.NewEvent("lesson.note", []byte(`not json`)) // labelled JSON, is not
	empty := outbox.NewEvent("lesson.viewed", []byte{})
	events := []outbox.Event{jsonEv, charset, vendor, binary, notJSON, empty}
	if err := pgx.BeginFunc(ctx, o.Pool, func(tx pgx.Tx) error { return w.Write(ctx, tx, events...) }); err != nil {
		t.Fatal(err)
	}
	insertBadHeaderRows(t, o)
	byID := map[string]outbox.Event{}
	for _, ev := range events {
		byID[ev.ID.String()] = ev
	}
	for _, d := range testenv.Receive(t, deliveries, len(events), 20*time.Second) {
		ev := byID[d.MessageId]
		if d.ContentType != rabbitmq.ContentTypeCloudEvents {
			t.Errorf("%s: content-type %q, want %s", ev.Type, d.ContentType, rabbitmq.ContentTypeCloudEvents)
		}
		var attrs map[string]any
		if err := json.Unmarshal(d.Body, &attrs); err != nil {
			t.Fatalf("%s: body is not JSON: %v\n%s", ev.Type, err, d.Body)
		}
		checkSpec(t, ev.Type, attrs)
		structured(t, o, d, ev, attrs)
		for k := range d.Headers {
			if strings.HasPrefix(strings.ToLower(k), "cloudevents") {
				t.Errorf("%s: AMQP header %s beside the document", ev.Type, k)
			}
		}
		if ev.Type == jsonEv.Type {
			if attrs["tenant"] != "t7" || attrs["dataschema"] != "https://edupulse.example/lesson.json" || d.Headers["schema-version"] != "2" {
				t.Errorf("%s: extensions %v %v, header schema-version %v: want tenant t7, the dataschema, and the header kept",
					ev.Type, attrs["tenant"], attrs["dataschema"], d.Headers["schema-version"])
			}
		}
	}
	awaitBadHeaderRowsDead(t, o)
}

// structured checks one structured message against its event, through the
// SDK and the raw document.
func structured(t *testing.T, o *testenv.Outbox, d amqp.Delivery, ev outbox.Event, attrs map[string]any) {
	t.Helper()
	e := ce.New()
	if err := json.Unmarshal(d.Body, &e); err != nil {
		t.Fatalf("%s: the CloudEvents SDK cannot decode it: %v\n%s", ev.Type, err, d.Body)
	}
	if err := e.Validate(); err != nil {
		t.Errorf("%s: the SDK finds it invalid: %v", ev.Type, err)
	}
	if e.SpecVersion() != "1.0" || e.ID() != ev.ID.String() || e.Type() != ev.Type || e.Source() != ceSource ||
		e.Subject() != ev.Key || e.DataContentType() != ev.ContentType || !e.Time().Equal(createdAt(t, o, ev.ID.String())) {
		t.Errorf("%s: SDK reads specversion %s id %s type %s source %s subject %q datacontenttype %q time %s",
			ev.Type, e.SpecVersion(), e.ID(), e.Type(), e.Source(), e.Subject(), e.DataContentType(), e.Time())
	}
	_, hasData := attrs["data"]
	_, hasBase64 := attrs["data_base64"]
	switch ev.Type {
	case "lesson.published", "quiz.submitted":
		if !hasData || hasBase64 || !bytes.Contains(d.Body, []byte(`"data":`+string(ev.Payload))) {
			t.Errorf("%s: JSON payload not embedded byte for byte as data:\n%s", ev.Type, d.Body)
		}
	case "lesson.viewed":
		if hasData || hasBase64 || len(e.Data()) != 0 {
			t.Errorf("%s: empty payload carries data:\n%s", ev.Type, d.Body)
		}
		return
	default:
		if hasData || !hasBase64 || !bytes.Equal(e.Data(), ev.Payload) {
			t.Errorf("%s: payload not data_base64, or decodes to %q:\n%s", ev.Type, e.Data(), d.Body)
		}
		return
	}
	var got, want any
	if err := json.Unmarshal(e.Data(), &got); err != nil {
		t.Fatalf("%s: SDK data %q: %v", ev.Type, e.Data(), err)
	}
	_ = json.Unmarshal(ev.Payload, &want)
	if gb, _ := json.Marshal(got); !bytes.Equal(gb, mustJSON(want)) {
		t.Errorf("%s: SDK data %s, want %s", ev.Type, e.Data(), ev.Payload)
	}
}

func mustJSON(v any) []byte {
	b, _ := json.Marshal(v)
	return b
}
