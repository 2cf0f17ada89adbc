package rabbitmq_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	amqp "github.com/rabbitmq/amqp091-go"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/metrics"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/relay/rabbitmq"
)

// refusedRow is a class of row that any application can write through
// plain SQL but the broker refuses, closing the channel or the connection.
type refusedRow struct {
	name   string
	insert string // INSERT of one row, %s the table
	reason string // the reason it is parked dead with
	names  string // what its last_error must name
	// closes is what the broker closes over it when it is sent: a channel
	// close costs no dial, a connection close two (the close, the search).
	closes string
}

// refusedRows are the classes of issue 12 (the default frame_max is 131,072).
var refusedRows = []refusedRow{
	{"headers over frame_max", `INSERT INTO %s (event_type, payload, headers)
		VALUES ('bad.event', '{}', jsonb_build_object('big', repeat('h', 200000)))`, "too_large", "frame_max", "connection"},
	{"CC header not an array", `INSERT INTO %s (event_type, payload, headers)
		VALUES ('bad.event', '{}', '{"CC": "other.key"}')`, "invalid", `"CC"`, "channel"},
	{"partition_key over frame_max", `INSERT INTO %s (event_type, payload, partition_key)
		VALUES ('bad.event', '{}', repeat('k', 200000))`, "too_large", "frame_max", "connection"},
}

// startRefusal runs a relay for o and b with its own AMQP publisher (so the
// test can count its dials) and its logs recorded.
func startRefusal(t *testing.T, o *testenv.Outbox, b *testenv.Broker, unforeseen bool) (*testenv.Relay, *rabbitmq.Publisher, *observer.ObservedLogs) {
	t.Helper()
	cfg := testenv.RelayConfig(o, b)
	cfg.Relay.MaxAttempts = 3
	cfg.Relay.RetryMinBackoff = 10 * time.Millisecond
	cfg.Relay.RetryMaxBackoff = 20 * time.Millisecond
	cfg = cfg.WithDefaults()
	core, logs := observer.New(zapcore.InfoLevel)
	log := zap.New(zapcore.NewTee(zaptest.NewLogger(t).Core(), core))
	// Without the app names relay.New adds: the edge tests size frames for
	// the default app id.
	pub := testenv.NewAMQPPublisher(t, cfg.AMQP, cfg.Relay.BatchSize, log.Named("amqp"))
	if unforeseen {
		rabbitmq.SkipChecks(pub)
	}
	return testenv.StartRelay(t, cfg, testenv.WithLogger(log), testenv.WithPublisher(pub)), pub, logs
}

// checkRefused runs one class of refused row at the head of a backlog of
// 1,000 ordinary events and checks the outcome: the bad row dead with its
// reason, every ordinary event delivered, at most maxDials connections.
func checkRefused(t *testing.T, c refusedRow, unforeseen bool, maxDials int64) {
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	deliveries := b.Consume(t, b.Queue(t, "#", nil))
	ctx := context.Background()
	if _, err := o.Pool.Exec(ctx, fmt.Sprintf(c.insert, o.Table.Quoted())); err != nil {
		t.Fatal(err)
	}
	good := o.WriteEvents(t, "good.event", 1000)
	r, pub, logs := startRefusal(t, o, b, unforeseen)

	if dups := testenv.ReceiveAll(t, deliveries, good, time.Minute); dups > 0 {
		t.Logf("%d duplicates", dups)
	}
	testenv.Eventually(t, 20*time.Second, "bad row dead, ordinary rows dispatched", func() bool {
		return o.Count(t, "event_type = 'bad.event' AND dead_at IS NOT NULL") == 1 &&
			o.Count(t, "dispatched_at IS NOT NULL") == len(good)
	})
	var (
		lastErr  string
		attempts int
	)
	if err := o.Pool.QueryRow(ctx, `SELECT last_error, attempts FROM `+o.Table.Quoted()+` WHERE event_type = 'bad.event'`).Scan(&lastErr, &attempts); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(lastErr, c.reason) || !strings.Contains(lastErr, c.names) || attempts != 1 {
		t.Errorf("bad row: last_error %q after %d attempts; want %s naming %s, after 1", lastErr, attempts, c.reason, c.names)
	}
	if n := o.Count(t, "attempts <> 0 AND event_type <> 'bad.event'"); n != 0 {
		t.Errorf("%d ordinary rows charged an attempt", n)
	}
	if n := pub.Dials(); n > maxDials {
		t.Errorf("%d connections opened, want at most %d", n, maxDials)
	} else {
		t.Logf("%d connections opened", n)
	}
	if n := testenv.LinkLogs(logs, "link down", metrics.LinkAMQP); n != 0 {
		t.Errorf("%d link down lines: a bad row must not take the link down", n)
	}
	if n := logs.FilterMessage("event parked dead").Len(); n != 1 {
		t.Errorf("%d warnings of a parked event, want 1", n)
	}
	if n := testenv.Value(t, r.Metrics.Failed.WithLabelValues("bad.event", c.reason)); n != 1 {
		t.Errorf("publish_failures_total{reason=%q} for the bad row is %v, want 1", c.reason, n)
	}
	if err := r.Ready(); err != nil {
		t.Errorf("relay not ready: %v", err)
	}
}

// TestRefusedRowAtHead: each row the broker would refuse, at the head of a
// backlog, is parked dead before it is sent, with a reason naming the
// limit, and the backlog behind it flows on the first connection.
func TestRefusedRowAtHead(t *testing.T) {
	t.Parallel()
	for _, c := range refusedRows {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			checkRefused(t, c, false, 1)
		})
	}
}

// TestUnforeseenRefusalBlamesMessage: with the checks before publishing
// turned off, as for a refusal they do not foresee, the broker's close is
// charged to the row that caused it, found by sending the unconfirmed rows
// alone: the row ends dead, the others arrive, and the link is neither
// taken down nor redialled in a storm: a channel close reopens a channel
// on the same connection; a connection close costs two dials, one after
// the close and one after the search's.
func TestUnforeseenRefusalBlamesMessage(t *testing.T) {
	t.Parallel()
	for _, c := range refusedRows {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			c := c
			c.names = "sent alone"
			if c.reason == "too_large" {
				c.names = "frame_too_large"
			}
			dials := int64(1)
			if c.closes == "connection" {
				dials = 3
			}
			checkRefused(t, c, true, dials)
		})
	}
}

// TestHeaderFrameAtFrameMax: a row whose header frame is exactly frame_max
// (AMQP 0-9-1 counts the whole frame) is published; one a byte larger is
// parked dead before it is sent. The edge comes from a frame encoded by
// hand, pinned against the broker with a raw client (RabbitMQ refuses a
// frame whose payload alone exceeds frame_max, 8 bytes past the spec's
// edge), never from the relay's own arithmetic: a relay size too small or
// too large by a byte fails.
func TestHeaderFrameAtFrameMax(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	deliveries := b.Consume(t, b.Queue(t, "#", nil))
	conn, err := amqp.Dial(b.URL)
	if err != nil {
		t.Fatal(err)
	}
	frameMax := conn.Config.FrameSize
	conn.Close()
	const typ = "edge.fits" // edge.over has the same length
	fill := frameMax - edgeFrameSize(typ, 0)
	const overhead = 8 // frame type, channel, payload size, frame end
	if !brokerAcceptsHeader(t, b.URL, typ, fill+overhead) || brokerAcceptsHeader(t, b.URL, typ, fill+overhead+1) {
		t.Fatalf("the hand-encoded header frame is off: at frame_max %d the broker's edge is not a %d-byte header", frameMax, fill+overhead)
	}
	ctx := context.Background()
	for typ, n := range map[string]int{"edge.fits": fill, "edge.over": fill + 1} {
		if _, err := o.Pool.Exec(ctx, `INSERT INTO `+o.Table.Quoted()+` (event_type, payload, headers)
			VALUES ($1, '{}', jsonb_build_object('big', repeat('h', $2)))`, typ, n); err != nil {
			t.Fatal(err)
		}
	}
	_, pub, logs := startRefusal(t, o, b, false)
	got := testenv.Receive(t, deliveries, 1, 30*time.Second)
	if got[0].Type != "edge.fits" || len(got[0].Headers["big"].(string)) != fill {
		t.Fatalf("received %s, want edge.fits with a %d-byte header", got[0].Type, fill)
	}
	testenv.Eventually(t, 10*time.Second, "edge.over dead as too_large", func() bool {
		return o.Count(t, "event_type = 'edge.over' AND dead_at IS NOT NULL AND last_error LIKE 'too_large%frame_max%'") == 1
	})
	if n := pub.Dials(); n != 1 {
		t.Errorf("%d connections opened, want 1: the broker closed one", n)
	}
	if n := testenv.LinkLogs(logs, "link down", metrics.LinkAMQP); n != 0 {
		t.Errorf("%d link down lines", n)
	}
}

// edgePublishing is the message the relay sends for an edge row: the
// default content type, a "big" header of n bytes beside x-outbox-seq, a
// persistent delivery mode, a UUID message-id, a timestamp, the type and
// the default app-id.
func edgePublishing(typ string, n int) amqp.Publishing {
	return amqp.Publishing{ContentType: "application/json", DeliveryMode: amqp.Persistent,
		Headers:   amqp.Table{"big": strings.Repeat("h", n), relay.HeaderSeq: int64(1)},
		MessageId: uuid.NewString(), Timestamp: time.Now(), Type: typ, AppId: "outbox-relay", Body: []byte("{}")}
}

// edgeFrameSize encodes edgePublishing's header frame by hand, per AMQP
// 0-9-1 (sections 4.2.3 and 4.2.6): frame type, channel and payload size,
// the content header (class id, weight, body size, property flags), each
// property present in flag order, and the frame end.
func edgeFrameSize(typ string, n int) int {
	shortstr := func(s string) int { return 1 + len(s) }
	headers := 4 + // table length
		shortstr("big") + 1 + 4 + n + // name, 'S', long string
		shortstr(relay.HeaderSeq) + 1 + 8 // name, 'l', int64
	props := shortstr("application/json") + headers + 1 + // delivery-mode octet
		shortstr(uuid.NewString()) + 8 + shortstr(typ) + shortstr("outbox-relay") // message-id, timestamp, type, app-id
	return 1 + 2 + 4 + (2 + 2 + 8 + 2) + props + 1
}

// brokerAcceptsHeader publishes edgePublishing with a raw client (not the
// relay) to an unrouted key and reports whether the broker confirmed it
// rather than closing the connection over its header frame.
func brokerAcceptsHeader(t *testing.T, url, typ string, n int) bool {
	t.Helper()
	conn, err := amqp.Dial(url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	closed := conn.NotifyClose(make(chan *amqp.Error, 1))
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if err := ch.Confirm(false); err != nil {
		t.Fatal(err)
	}
	dc, err := ch.PublishWithDeferredConfirm("", "edge-unrouted-"+uuid.NewString(), false, false, edgePublishing(typ, n))
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-dc.Done():
		return dc.Acked()
	case e := <-closed:
		if e == nil || e.Code != amqp.FrameError {
			t.Fatalf("%d-byte header: connection closed with %v, want a frame error", n, e)
		}
		return false
	case <-time.After(10 * time.Second):
		t.Fatalf("%d-byte header: neither confirmed nor refused within 10s", n)
		return false
	}
}

// TestUnforeseenRefusalsInOneBatch: two rows the broker refuses, unforeseen
// by the checks, inside one batch of ordinary events: each is found and
// parked in turn (one search per close), every ordinary event arrives, and
// the connection is never redialled for a channel close.
func TestUnforeseenRefusalsInOneBatch(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	deliveries := b.Consume(t, b.Queue(t, "#", nil))
	ctx := context.Background()
	before := o.WriteEvents(t, "good.event", 100)
	bad := `INSERT INTO ` + o.Table.Quoted() + ` (event_type, payload, headers) VALUES ('bad.event', '{}', '{"BCC": 7}')`
	if _, err := o.Pool.Exec(ctx, bad); err != nil {
		t.Fatal(err)
	}
	between := o.WriteEvents(t, "good.event", 100)
	if _, err := o.Pool.Exec(ctx, bad); err != nil {
		t.Fatal(err)
	}
	after := o.WriteEvents(t, "good.event", 100)
	r, pub, logs := startRefusal(t, o, b, true)

	good := map[string]outbox.Event{}
	for _, m := range []map[string]outbox.Event{before, between, after} {
		for id, ev := range m {
			good[id] = ev
		}
	}
	testenv.ReceiveAll(t, deliveries, good, time.Minute)
	testenv.Eventually(t, 20*time.Second, "both bad rows dead, ordinary rows dispatched", func() bool {
		return o.Count(t, "event_type = 'bad.event' AND dead_at IS NOT NULL AND attempts = 1 AND last_error LIKE 'invalid: the broker closed%BCC%'") == 2 &&
			o.Count(t, "dispatched_at IS NOT NULL") == len(good)
	})
	if n := o.Count(t, "attempts <> 0 AND event_type <> 'bad.event'"); n != 0 {
		t.Errorf("%d ordinary rows charged an attempt", n)
	}
	if n := pub.Dials(); n != 1 {
		t.Errorf("%d connections opened, want 1: a channel close needs no redial", n)
	}
	if n := logs.FilterMessage("event parked dead").Len(); n != 2 {
		t.Errorf("%d warnings of a parked event, want 2", n)
	}
	if n := testenv.LinkLogs(logs, "link down", metrics.LinkAMQP); n != 0 {
		t.Errorf("%d link down lines", n)
	}
	if n := testenv.Value(t, r.Metrics.Failed.WithLabelValues("bad.event", "invalid")); n != 2 {
		t.Errorf("publish_failures_total{reason=invalid} for the bad rows is %v, want 2", n)
	}
}
