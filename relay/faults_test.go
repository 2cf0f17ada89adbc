package relay_test

// Fault paths of the engine against real servers: a broker-enforced message
// size limit, a RabbitMQ outage, a PostgreSQL outage, confirms that never
// come, and unroutable events accepted with and without an alternate
// exchange. A test that stops, restarts or throttles a server runs its own
// private one (testenv.StartPostgres, StartRabbitMQ), never the shared one.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/metrics"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
)

// outage is how long a server stays down in the outage tests: long enough
// for several reconnect attempts (their delay doubles from 100 ms and caps
// at 1 s). It is the fault's duration, not a wait for a condition.
const outage = 3 * time.Second

// startObserved is start with the relay's logs also recorded, so a test can
// count them.
func startObserved(t *testing.T, cfg relay.Config) (*running, *observer.ObservedLogs) {
	t.Helper()
	core, logs := observer.New(zapcore.DebugLevel)
	log := zap.New(zapcore.NewTee(zaptest.NewLogger(t).Core(), core))
	return startLogged(t, cfg, log), logs
}

// ids lists the message ids of events, for an id = ANY($1::uuid[]) condition.
func ids(events ...map[string]outbox.Event) []string {
	var out []string
	for _, m := range events {
		for id := range m {
			out = append(out, id)
		}
	}
	return out
}

// withChannel runs fn on a channel of a short-lived connection to url.
func withChannel(t *testing.T, url string, fn func(*amqp.Channel) error) {
	t.Helper()
	conn, err := amqp.Dial(url)
	if err != nil {
		t.Fatalf("dial %s: %v", url, err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatalf("channel: %v", err)
	}
	if err := fn(ch); err != nil {
		t.Fatal(err)
	}
}

// consume returns the deliveries of queue (auto-ack) on a connection of
// its own, closed at cleanup.
func consume(t *testing.T, url, queue string) <-chan amqp.Delivery {
	t.Helper()
	return (&testenv.Broker{URL: url}).Consume(t, queue)
}

// withMaxMessageSize starts a private broker that refuses messages over
// limit bytes, and returns an outbox, that broker, and the deliveries of a
// queue bound to good.#.
func withMaxMessageSize(t *testing.T, limit int) (*testenv.Outbox, *testenv.Broker, <-chan amqp.Delivery) {
	t.Helper()
	rmq := testenv.StartRabbitMQWith(t, testenv.RabbitMQOptions{Conf: []string{fmt.Sprintf("max_message_size = %d", limit)}})
	o, b := testenv.NewOutbox(t), testenv.NewBrokerAt(t, rmq.URL())
	return o, b, b.Consume(t, b.Queue(t, "good.#", nil))
}

// around returns n good.event events with huge in their middle, and the
// good ones by id.
func around(n int, huge outbox.Event) (map[string]outbox.Event, []outbox.Event) {
	good := map[string]outbox.Event{}
	events := make([]outbox.Event, 0, n+1)
	for i := range n {
		ev := outbox.NewEvent("good.event", fmt.Appendf(nil, `{"n":%d}`, i))
		good[ev.ID.String()] = ev
		events = append(events, ev)
		if i == n/2-1 {
			events = append(events, huge)
		}
	}
	return good, events
}

// TestBrokerEnforcedMaxMessageSize: the broker limits messages to 1 MiB
// while the relay's amqp.max_message_size stays at its 128 MiB default, so
// the relay sends the 2 MiB event and RabbitMQ closes the channel over it.
// The relay learns the limit from the close reason and parks that event dead
// with the broker's reason; the good events of the same batch, confirmed
// before the close or cut off by it, are all delivered and charged no
// attempt; a later oversized event is parked without another channel close;
// the relay is ready afterwards.
func TestBrokerEnforcedMaxMessageSize(t *testing.T) {
	t.Parallel()
	const limit = 1 << 20
	o, b, deliveries := withMaxMessageSize(t, limit)
	cfg := config(o, b)
	cfg.Relay.RetryMinBackoff = 10 * time.Millisecond
	cfg.Relay.RetryMaxBackoff = 20 * time.Millisecond

	// All in one transaction, written before the relay starts: one batch
	// (300 good rows and the oversized one, under relay.batch_size 500),
	// with good rows on both sides of the oversized one.
	good, events := around(300, outbox.NewEvent("good.huge", bytes.Repeat([]byte("x"), 2<<20)))
	oversized := events[150]
	o.Commit(t, events...)

	r, logs := startObserved(t, cfg)
	if got := r.Config().AMQP.MaxMessageSize; got != 128<<20 {
		t.Fatalf("amqp.max_message_size %d, want the 128 MiB default: the relay must not filter by itself here", got)
	}
	dups := testenv.ReceiveAll(t, deliveries, good, 30*time.Second)
	t.Logf("%d duplicates (good events whose confirm the channel close cut off)", dups)

	testenv.Eventually(t, 20*time.Second, "oversized row dead, good rows dispatched", func() bool {
		return o.Count(t, "id = $1 AND dead_at IS NOT NULL", oversized.ID) == 1 &&
			o.Count(t, "dispatched_at IS NOT NULL") == len(good)
	})
	ctx := context.Background()
	var (
		lastErr  string
		attempts int
	)
	if err := o.Pool.QueryRow(ctx, `SELECT last_error, attempts FROM `+o.Table.Quoted()+` WHERE id = $1`, oversized.ID).Scan(&lastErr, &attempts); err != nil {
		t.Fatal(err)
	}
	// The broker's own close reason in last_error shows the limit was
	// learned from the channel close (learnMaxSize), not pre-filtered.
	if !strings.HasPrefix(lastErr, "too_large") || !strings.Contains(lastErr, fmt.Sprint(limit)) ||
		!strings.Contains(lastErr, "larger than configured max size") || attempts != 1 {
		t.Errorf("oversized row: last_error %q after %d attempts; want too_large with the broker's %d-byte limit and close reason, after 1", lastErr, attempts, limit)
	}
	if n := o.Count(t, "attempts <> 0 AND id <> $1", oversized.ID); n != 0 {
		t.Errorf("%d good rows were charged an attempt; a channel close must charge none", n)
	}
	learned := logs.FilterMessageSnippet("the broker's max message size is below amqp.max_message_size").
		FilterField(zap.Int("broker_max_message_size", limit)).Len()
	if learned != 1 {
		t.Errorf("%d logs of the learned broker limit, want 1", learned)
	}
	testenv.Eventually(t, 10*time.Second, "relay ready after the channel close", func() bool { return r.Ready() == nil })

	// The limit is remembered: a second oversized event is parked before it
	// is sent, so the channel is not closed (and reopened) again.
	reconnects := value(t, r.Metrics.Reconnects.WithLabelValues(metrics.LinkAMQP))
	again := outbox.NewEvent("good.huge", bytes.Repeat([]byte("y"), limit+1))
	more := o.WriteEvents(t, "good.later", 50)
	o.Commit(t, again)
	testenv.ReceiveAll(t, deliveries, more, 20*time.Second, good)
	testenv.Eventually(t, 10*time.Second, "second oversized row dead", func() bool {
		return o.Count(t, "id = $1 AND dead_at IS NOT NULL AND last_error LIKE 'too_large%'", again.ID) == 1
	})
	if got := value(t, r.Metrics.Reconnects.WithLabelValues(metrics.LinkAMQP)); got != reconnects {
		t.Errorf("amqp reconnects went from %v to %v: the learned limit was not applied before sending", reconnects, got)
	}
	if err := r.Ready(); err != nil {
		t.Errorf("relay not ready after the poison events: %v", err)
	}
}

// TestBrokerEnforcedMaxMessageSizeStructured: in structured CloudEvents
// mode the broker measures the document, which is larger than the payload.
// An event whose payload fits the broker's 1 MiB but whose document does
// not closes the channel; the relay names it from the close by the size of
// the body it published, parks it dead with the broker's reason, and needs
// no search for the culprit (no message is sent again alone), while the
// events around it are delivered.
func TestBrokerEnforcedMaxMessageSizeStructured(t *testing.T) {
	t.Parallel()
	const limit = 1 << 20
	o, b, deliveries := withMaxMessageSize(t, limit)
	cfg := config(o, b)
	cfg.AMQP.Format = relay.FormatCloudEventsStructured
	cfg.AMQP.CloudEventsSource = "//edupulse/test"

	// JSON, so its document is the payload and about 300 bytes more: the
	// payload fits the limit, the document does not.
	payload := []byte(`{"p":"` + strings.Repeat("x", limit-100) + `"}`)
	good, events := around(40, outbox.NewEvent("good.huge", payload))
	oversized := events[20]
	if len(oversized.Payload) > limit {
		t.Fatalf("the oversized event's payload is %d bytes: it must fit the %d-byte limit", len(oversized.Payload), limit)
	}
	o.Commit(t, events...)

	r, logs := startObserved(t, cfg)
	// The bodies are documents: each JSON payload is their data, as it is.
	testenv.ReceiveAllAs(t, deliveries, good, 30*time.Second, func(d amqp.Delivery) ([]byte, error) {
		var doc struct{ Data json.RawMessage }
		err := json.Unmarshal(d.Body, &doc)
		return doc.Data, err
	})
	testenv.Eventually(t, 20*time.Second, "oversized row dead, good rows dispatched", func() bool {
		return o.Count(t, "id = $1 AND dead_at IS NOT NULL", oversized.ID) == 1 &&
			o.Count(t, "dispatched_at IS NOT NULL") == len(good)
	})
	var lastErr string
	if err := o.Pool.QueryRow(context.Background(), `SELECT last_error FROM `+o.Table.Quoted()+` WHERE id = $1`, oversized.ID).Scan(&lastErr); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(lastErr, "too_large: message body is") || !strings.Contains(lastErr, "larger than configured max size") {
		t.Errorf("oversized row: last_error %q; want too_large, its document's size and the broker's close reason", lastErr)
	}
	if n := logs.FilterMessageSnippet("sending the unconfirmed ones alone to find it").Len(); n != 0 {
		t.Errorf("%d searches for the culprit: the close should have named it by the size of its document", n)
	}
	if err := r.Ready(); err != nil {
		t.Errorf("relay not ready after the oversized document: %v", err)
	}
}

// TestRabbitMQOutage: the broker stops while the relay runs and events are
// written. The relay reports the amqp link down (readiness, link_up),
// retries the dial with backoff without logging each attempt, and once the
// broker is back delivers every event, charging no attempt for the lost
// connection, with one "link down", one "link restored" and one reconnect.
// The relay notices the outage when it claims the events written meanwhile;
// an idle relay does not (TestRabbitMQOutageIdleRelay).
func TestRabbitMQOutage(t *testing.T) {
	t.Parallel()
	rmq := testenv.StartRabbitMQ(t)
	o, b := testenv.NewOutbox(t), testenv.NewBrokerAt(t, rmq.URL()) // durable exchange
	queue := b.DurableQueue(t, "#", nil)
	r, logs := startObserved(t, config(o, b))

	before := o.WriteEvents(t, "order.placed", 20)
	testenv.Eventually(t, 20*time.Second, "events before the outage dispatched", func() bool {
		return o.Count(t, "dispatched_at IS NOT NULL") == len(before)
	})
	testenv.Eventually(t, 10*time.Second, "relay ready", func() bool { return r.Ready() == nil })

	rmq.Stop(t)
	during := o.WriteEvents(t, "order.paid", 200)
	testenv.Eventually(t, 10*time.Second, "readiness reports the amqp link down", func() bool {
		err := r.Ready()
		return err != nil && strings.Contains(err.Error(), metrics.LinkAMQP+":")
	})
	if up := value(t, r.Metrics.LinkUp.WithLabelValues(metrics.LinkAMQP)); up != 0 {
		t.Errorf("link_up{link=amqp} = %v while the broker is down, want 0", up)
	}
	time.Sleep(outage) // the fault lasts; the relay keeps redialling
	if n := o.Count(t, "dispatched_at IS NOT NULL"); n != len(before) {
		t.Errorf("%d rows dispatched while the broker was down, want %d (those before)", n, len(before))
	}
	rmq.Start(t)

	all := map[string]outbox.Event{}
	for _, m := range []map[string]outbox.Event{before, during} {
		for id, ev := range m {
			all[id] = ev
		}
	}
	testenv.Eventually(t, 20*time.Second, "every row dispatched after the broker is back", func() bool {
		return o.Count(t, "dispatched_at IS NOT NULL") == len(all)
	})
	dups := testenv.ReceiveAll(t, consume(t, rmq.URL(), queue), all, 20*time.Second)
	t.Logf("%d duplicates", dups)
	if n := o.Count(t, "attempts <> 0 OR last_error IS NOT NULL"); n != 0 {
		t.Errorf("%d rows charged an attempt or given an error; a lost connection must charge none", n)
	}
	down, restored := testenv.LinkLogs(logs, "link down", metrics.LinkAMQP), testenv.LinkLogs(logs, "link restored", metrics.LinkAMQP)
	if down != 1 || restored != 1 {
		t.Errorf("amqp: %d \"link down\" and %d \"link restored\" logs, want 1 each (one per state change, not per retry)", down, restored)
	}
	if n := value(t, r.Metrics.Reconnects.WithLabelValues(metrics.LinkAMQP)); n != 1 {
		t.Errorf("reconnects_total{link=amqp} = %v, want 1", n)
	}
	if up := value(t, r.Metrics.LinkUp.WithLabelValues(metrics.LinkAMQP)); up != 1 {
		t.Errorf("link_up{link=amqp} = %v after the broker is back, want 1", up)
	}
	if err := r.Ready(); err != nil {
		t.Errorf("relay not ready after the outage: %v", err)
	}
}

// TestRabbitMQOutageIdleRelay: an idle relay (nothing to publish) notices
// that the broker went away: readiness and link_up{link=amqp} report it.
// (A closed channel once read as ready until an event was claimed and its
// send failed.)
func TestRabbitMQOutageIdleRelay(t *testing.T) {
	t.Parallel()
	rmq := testenv.StartRabbitMQ(t)
	o, b := testenv.NewOutbox(t), testenv.NewBrokerAt(t, rmq.URL())
	r, logs := startObserved(t, config(o, b))
	testenv.Eventually(t, 10*time.Second, "relay ready", func() bool { return r.Ready() == nil })

	rmq.Stop(t)
	testenv.Eventually(t, 10*time.Second, "readiness reports the amqp link down", func() bool {
		err := r.Ready()
		return err != nil && strings.Contains(err.Error(), metrics.LinkAMQP+":")
	})
	if up := value(t, r.Metrics.LinkUp.WithLabelValues(metrics.LinkAMQP)); up != 0 {
		t.Errorf("link_up{link=amqp} = %v while the broker is down, want 0", up)
	}
	rmq.Start(t)
	testenv.Eventually(t, 10*time.Second, "relay ready after the broker is back", func() bool { return r.Ready() == nil })
	if down := testenv.LinkLogs(logs, "link down", metrics.LinkAMQP); down != 1 {
		t.Errorf("%d amqp \"link down\" logs, want 1", down)
	}
}

// TestPostgresOutage: the database stops while the relay runs. The relay
// reports the postgres link down, keeps retrying without logging each
// attempt, and once the database is back it relays an event written then
// within a few seconds, with one "link down", one "link restored" and one
// reconnect for postgres.
func TestPostgresOutage(t *testing.T) {
	t.Parallel()
	pg := testenv.StartPostgres(t)
	o, b := testenv.NewOutboxAt(t, pg.DSN()), testenv.NewBroker(t)
	deliveries := b.Consume(t, b.Queue(t, "#", nil))
	r, logs := startObserved(t, config(o, b))

	testenv.ReceiveAll(t, deliveries, o.WriteEvents(t, "user.created", 5), 20*time.Second)
	// Marked too, so that no batch is in flight when the database stops
	// (one would be rolled back and published again: at-least-once).
	testenv.Eventually(t, 10*time.Second, "events before the outage dispatched", func() bool {
		return o.Count(t, "dispatched_at IS NOT NULL") == 5
	})
	testenv.Eventually(t, 10*time.Second, "relay ready", func() bool { return r.Ready() == nil })

	pg.Stop(t)
	testenv.Eventually(t, 10*time.Second, "readiness reports the postgres link down", func() bool {
		err := r.Ready()
		return err != nil && strings.Contains(err.Error(), metrics.LinkPostgres+":")
	})
	if up := value(t, r.Metrics.LinkUp.WithLabelValues(metrics.LinkPostgres)); up != 0 {
		t.Errorf("link_up{link=postgres} = %v while the database is down, want 0", up)
	}
	time.Sleep(outage) // the fault lasts; the relay keeps retrying
	pg.Start(t)
	o.Pool.Reset() // the test's own connections died with the server

	written := time.Now()
	after := o.WriteEvents(t, "user.renamed", 1)
	testenv.ReceiveAll(t, deliveries, after, 5*time.Second)
	t.Logf("written after the restart → received in %s", time.Since(written).Round(time.Millisecond))
	testenv.Eventually(t, 10*time.Second, "event dispatched", func() bool {
		return o.Count(t, "id = ANY($1::uuid[]) AND dispatched_at IS NOT NULL AND attempts = 0", ids(after)) == 1
	})
	testenv.Eventually(t, 10*time.Second, "relay ready", func() bool { return r.Ready() == nil })
	down, restored := testenv.LinkLogs(logs, "link down", metrics.LinkPostgres), testenv.LinkLogs(logs, "link restored", metrics.LinkPostgres)
	if down != 1 || restored != 1 {
		t.Errorf("postgres: %d \"link down\" and %d \"link restored\" logs, want 1 each (one per state change, not per retry)", down, restored)
	}
	if n := value(t, r.Metrics.Reconnects.WithLabelValues(metrics.LinkPostgres)); n != 1 {
		t.Errorf("reconnects_total{link=postgres} = %v, want 1", n)
	}
	if n := testenv.LinkLogs(logs, "link down", metrics.LinkAMQP); n != 0 {
		t.Errorf("%d amqp \"link down\" logs during a database outage, want 0", n)
	}
}

// blockPublishers raises a memory alarm on rmq (vm_memory_high_watermark 0),
// which makes RabbitMQ stop reading from every connection that publishes,
// so their messages get no confirm. It returns once a probe connection of
// its own was blocked; unblock clears the alarm and returns once the probe
// is unblocked. Cleanup unblocks if the test did not.
func blockPublishers(t *testing.T, rmq *testenv.RabbitMQ) (unblock func()) {
	t.Helper()
	conn, err := amqp.Dial(rmq.URL())
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	ch, err := conn.Channel()
	if err != nil {
		t.Fatalf("channel: %v", err)
	}
	blockings := conn.NotifyBlocked(make(chan amqp.Blocking, 4))
	awaitBlocking := func(active bool, probe func()) {
		t.Helper()
		deadline := time.After(15 * time.Second)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			probe()
			select {
			case b := <-blockings:
				if b.Active == active {
					return
				}
			case <-tick.C:
			case <-deadline:
				t.Fatalf("probe connection not blocked=%v within 15s", active)
			}
		}
	}
	rmq.Ctl(t, "set_vm_memory_high_watermark", "0")
	// RabbitMQ blocks (and tells) a connection when it publishes under the
	// alarm: publish unroutable probes until it does.
	awaitBlocking(true, func() {
		_ = ch.PublishWithContext(context.Background(), "", testenv.Name("nowhere"), false, false, amqp.Publishing{Body: []byte("probe")})
	})
	var once sync.Once
	unblock = func() {
		once.Do(func() {
			rmq.Ctl(t, "set_vm_memory_high_watermark", "0.4")
			awaitBlocking(false, func() {})
			_ = conn.Close()
		})
	}
	t.Cleanup(unblock)
	return unblock
}

// blockedBroker starts a private RabbitMQ and an outbox relaying to it with
// a 1 s confirm timeout and short retry backoffs.
func blockedBroker(t *testing.T) (*testenv.RabbitMQ, *testenv.Outbox, <-chan amqp.Delivery, *running) {
	t.Helper()
	return blockedBrokerWith(t, testenv.RabbitMQOptions{})
}

// blockedBrokerWith is blockedBroker with options for the private RabbitMQ.
func blockedBrokerWith(t *testing.T, opts testenv.RabbitMQOptions) (*testenv.RabbitMQ, *testenv.Outbox, <-chan amqp.Delivery, *running) {
	t.Helper()
	rmq := testenv.StartRabbitMQWith(t, opts)
	o, b := testenv.NewOutbox(t), testenv.NewBrokerAt(t, rmq.URL())
	deliveries := b.Consume(t, b.Queue(t, "#", nil))
	cfg := config(o, b)
	cfg.AMQP.ConfirmTimeout = time.Second
	cfg.Relay.MaxAttempts = 1000 // never dead here
	cfg.Relay.RetryMinBackoff = 100 * time.Millisecond
	cfg.Relay.RetryMaxBackoff = 300 * time.Millisecond
	r, _ := startObserved(t, cfg)
	testenv.ReceiveAll(t, deliveries, o.WriteEvents(t, "warmup", 1), 20*time.Second)
	return rmq, o, deliveries, r
}

// TestConfirmTimeout: while a memory alarm blocks publishers, events sent
// get no confirm; after amqp.confirm_timeout they are charged an attempt
// with a timeout error while the alarm lasts, and are not marked
// dispatched. Once the alarm clears they are delivered and dispatched.
// TestConfirmTimeoutRecordedWhileBlockedBrokerSendsHeartbeats pins the
// bounded close that recording during the alarm depends on.
func TestConfirmTimeout(t *testing.T) {
	t.Parallel()
	rmq, o, deliveries, r := blockedBroker(t)

	unblock := blockPublishers(t, rmq)
	blocked := o.WriteEvents(t, "invoice.sent", 20)
	// The timeouts are recorded while the broker still blocks, not only once
	// it recovers: claim, the 1 s confirm timeout and a connection.close
	// bounded at 2 s take seconds, and more on a loaded machine.
	testenv.Eventually(t, 30*time.Second, "timeouts recorded while blocked", func() bool {
		return o.Count(t, "id = ANY($1::uuid[]) AND attempts >= 1 AND last_error LIKE 'timeout: no confirm within 1s%'", ids(blocked)) == len(blocked)
	})
	if n := o.Count(t, "id = ANY($1::uuid[]) AND dispatched_at IS NOT NULL", ids(blocked)); n != 0 {
		t.Errorf("%d events dispatched without a confirm", n)
	}
	unblock()

	dups := testenv.ReceiveAll(t, deliveries, blocked, 20*time.Second)
	t.Logf("%d duplicates", dups)
	testenv.Eventually(t, 20*time.Second, "blocked events dispatched after the alarm cleared", func() bool {
		return o.Count(t, "id = ANY($1::uuid[]) AND dispatched_at IS NOT NULL", ids(blocked)) == len(blocked)
	})
	if got := value(t, r.Metrics.Failed.WithLabelValues("invoice.sent", string(relay.ReasonTimeout))); got < float64(len(blocked)) {
		t.Errorf("events_failed_total{reason=timeout} = %v, want at least %d", got, len(blocked))
	}
	testenv.Eventually(t, 10*time.Second, "relay ready", func() bool { return r.Ready() == nil })
}

// TestBlockedBrokerFullSocketStops: under a memory alarm the broker stops
// reading, and a batch larger than the socket buffers (40 events of 1 MiB)
// leaves the publisher blocked in a write. The write fails after
// amqp.confirm_timeout, so the relay still stops within its shutdown timeout
// instead of waiting for the alarm to clear; a relay started after the alarm
// delivers every event.
func TestBlockedBrokerFullSocketStops(t *testing.T) {
	t.Parallel()
	rmq, o, deliveries, r := blockedBroker(t)
	unblock := blockPublishers(t, rmq)
	big := map[string]outbox.Event{}
	for range 40 {
		ev := outbox.NewEvent("report.exported", bytes.Repeat([]byte("r"), 1<<20))
		big[ev.ID.String()] = ev
		o.Commit(t, ev)
	}
	// The relay has claimed them and is publishing into the blocked socket.
	testenv.Eventually(t, 10*time.Second, "the big events claimed", func() bool {
		return o.Count(t, "id = ANY($1::uuid[]) AND id IN (SELECT id FROM "+o.Table.Quoted()+" FOR UPDATE SKIP LOCKED)", ids(big)) < len(big)
	})
	begin := time.Now()
	if err := r.Stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	// Shutdown waits up to relay.shutdown_timeout (5s) for confirms, and a
	// blocked write gives up after amqp.confirm_timeout (1s).
	if took := time.Since(begin); took > 15*time.Second {
		t.Fatalf("the relay took %v to stop while the broker was blocked", took.Round(time.Millisecond))
	}
	if n := o.Count(t, "id = ANY($1::uuid[]) AND dispatched_at IS NOT NULL", ids(big)); n != 0 {
		t.Fatalf("%d events dispatched while the broker was blocked", n)
	}
	unblock()
	cfg := r.Config()
	start(t, cfg)
	testenv.ReceiveAll(t, deliveries, big, time.Minute)
	testenv.Eventually(t, 20*time.Second, "every big event dispatched", func() bool {
		return o.Count(t, "id = ANY($1::uuid[]) AND dispatched_at IS NOT NULL", ids(big)) == len(big)
	})
}

// TestUnroutableAcceptWithAlternateExchange: with amqp.unroutable: accept on
// an exchange whose alternate exchange (a fanout with a bound queue) takes
// what no binding matches, events with a routing key nothing binds land on
// the alternate queue and are dispatched at the first attempt.
//
// RabbitMQ does not return a mandatory message that an alternate exchange
// routed: to the publisher it was routed, so no basic.return comes and
// outbox_relay_events_returned_total stays 0. The counter counts returns,
// which only happen when the alternate exchange routes nowhere either.
func TestUnroutableAcceptWithAlternateExchange(t *testing.T) {
	t.Parallel()
	url := testenv.AMQPURL()
	exchange, alternate := testenv.Name("x"), testenv.Name("ae")
	aeQueue := testenv.Name("q")
	withChannel(t, url, func(ch *amqp.Channel) error {
		if err := ch.ExchangeDeclare(alternate, "fanout", false, false, false, false, nil); err != nil {
			return err
		}
		if err := ch.ExchangeDeclare(exchange, "topic", false, false, false, false, amqp.Table{"alternate-exchange": alternate}); err != nil {
			return err
		}
		if _, err := ch.QueueDeclare(aeQueue, false, false, false, false, nil); err != nil {
			return err
		}
		return ch.QueueBind(aeQueue, "", alternate, false, nil)
	})
	t.Cleanup(func() {
		if conn, err := amqp.Dial(url); err == nil {
			defer conn.Close()
			if ch, err := conn.Channel(); err == nil {
				_, _ = ch.QueueDelete(aeQueue, false, false, false)
				_ = ch.ExchangeDelete(exchange, false, false)
				_ = ch.ExchangeDelete(alternate, false, false)
			}
		}
	})
	deliveries := consume(t, url, aeQueue)

	o := testenv.NewOutbox(t)
	cfg := config(o, &testenv.Broker{URL: url, Exchange: exchange}) // declare_exchange: false
	cfg.AMQP.Unroutable = relay.UnroutableAccept
	cfg.Relay.RetryMinBackoff = time.Hour // a retry would show as attempts, not a redelivery
	cfg.Relay.RetryMaxBackoff = time.Hour
	r, _ := startObserved(t, cfg)

	events := o.WriteEvents(t, "nobody.binds", 30)
	dups := testenv.ReceiveAll(t, deliveries, events, 20*time.Second)
	if dups != 0 {
		t.Errorf("%d duplicates on the alternate queue", dups)
	}
	testenv.Eventually(t, 10*time.Second, "events dispatched", func() bool {
		return o.Count(t, "dispatched_at IS NOT NULL") == len(events)
	})
	if n := o.Count(t, "attempts <> 0 OR last_error IS NOT NULL"); n != 0 {
		t.Errorf("%d rows were retried; the alternate exchange routed them", n)
	}
	if n := counterSum(t, r.Metrics.Returned); n != 0 {
		t.Errorf("events_returned_total = %d, want 0: RabbitMQ returns nothing the alternate exchange routed", n)
	}
	if n := counterSum(t, r.Metrics.Published); n != len(events) {
		t.Errorf("events_published_total = %d, want %d", n, len(events))
	}
}

// TestUnroutableAcceptWithoutAlternateExchange: with amqp.unroutable:
// accept and nothing to catch them, unroutable events are returned by the
// broker, counted as returned, and marked dispatched as configured (the
// operator said returns are acceptable); routed events of the same batches
// are delivered as usual and not counted as returned.
func TestUnroutableAcceptWithoutAlternateExchange(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	deliveries := b.Consume(t, b.Queue(t, "routed.#", nil))
	cfg := config(o, b)
	cfg.AMQP.Unroutable = relay.UnroutableAccept
	cfg.Relay.RetryMinBackoff = time.Hour
	cfg.Relay.RetryMaxBackoff = time.Hour
	r, _ := startObserved(t, cfg)

	const n = 40
	routed, lost := map[string]outbox.Event{}, map[string]outbox.Event{}
	events := make([]outbox.Event, 0, 2*n)
	for i := range n {
		a := outbox.NewEvent("routed.event", fmt.Appendf(nil, `{"n":%d}`, i))
		u := outbox.NewEvent("nobody.binds", fmt.Appendf(nil, `{"n":%d}`, i))
		routed[a.ID.String()], lost[u.ID.String()] = a, u
		events = append(events, a, u)
	}
	o.Commit(t, events...)
	testenv.ReceiveAll(t, deliveries, routed, 20*time.Second)
	testenv.Eventually(t, 10*time.Second, "every row dispatched", func() bool {
		return o.Count(t, "dispatched_at IS NOT NULL") == 2*n
	})
	if c := o.Count(t, "attempts <> 0 OR last_error IS NOT NULL"); c != 0 {
		t.Errorf("%d rows were retried; accepted returns must not be", c)
	}
	if got := value(t, r.Metrics.Returned.WithLabelValues("nobody.binds")); got != n {
		t.Errorf("events_returned_total{event_type=nobody.binds} = %v, want %d", got, n)
	}
	if got := counterSum(t, r.Metrics.Returned); got != n {
		t.Errorf("events_returned_total = %d in all, want %d (routed events are not returned)", got, n)
	}
	if got := counterSum(t, r.Metrics.Failed); got != 0 {
		t.Errorf("events_failed_total = %d, want 0: accepted returns are not failures", got)
	}
	if _, quiet := testenv.Quiet(deliveries, 200*time.Millisecond); !quiet {
		t.Error("an extra message arrived on the routed queue")
	}
}

// TestExchangeMissing: with declare_exchange off, a relay whose exchange
// does not exist stays not ready, saying which exchange the broker lacks;
// an exchange deleted under a running relay fails the batch with the
// broker's reason (404 NOT_FOUND), charges no attempt, and once the
// exchange is back every event is delivered.
func TestExchangeMissing(t *testing.T) {
	t.Parallel()
	t.Run("at_start", func(t *testing.T) {
		t.Parallel()
		o := testenv.NewOutbox(t)
		missing := testenv.Name("missing")
		r := start(t, config(o, &testenv.Broker{URL: testenv.AMQPURL(), Exchange: missing}))
		testenv.Eventually(t, 10*time.Second, "not ready, naming the exchange", func() bool {
			err := r.Ready()
			return err != nil && strings.Contains(err.Error(), fmt.Sprintf("exchange %q not found", missing)) &&
				strings.Contains(err.Error(), "NOT_FOUND - no exchange '"+missing+"'")
		})
	})
	t.Run("deleted_while_running", func(t *testing.T) {
		t.Parallel()
		o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
		queue := b.Queue(t, "#", nil)
		deliveries := b.Consume(t, queue)
		r, logs := startObserved(t, config(o, b))
		testenv.ReceiveAll(t, deliveries, o.WriteEvents(t, "invoice.sent", 1), 10*time.Second)

		ch := b.Channel(t)
		if err := ch.ExchangeDelete(b.Exchange, false, false); err != nil {
			t.Fatal(err)
		}
		events := o.WriteEvents(t, "invoice.sent", 3)
		// The settler reports the closed channel, or the claim loop's
		// reconnect (its passive declare) gets there first: either way the
		// broker's words are in the line.
		testenv.Eventually(t, 10*time.Second, "the broker's reason logged", func() bool {
			for _, e := range logs.FilterMessage("link down").All() {
				if err, _ := e.ContextMap()["error"].(string); strings.Contains(err, "NOT_FOUND - no exchange '"+b.Exchange+"'") {
					return true
				}
			}
			return false
		})
		testenv.Eventually(t, 10*time.Second, "not ready while the exchange is missing", func() bool {
			err := r.Ready()
			return err != nil && strings.Contains(err.Error(), "not found")
		})
		if n := o.Count(t, "id = ANY($1::uuid[]) AND (dispatched_at IS NOT NULL OR dead_at IS NOT NULL OR attempts > 0)", ids(events)); n != 0 {
			t.Fatalf("%d events dispatched, dead or charged an attempt with no exchange to publish to", n)
		}

		if err := ch.ExchangeDeclare(b.Exchange, "topic", true, false, false, false, nil); err != nil {
			t.Fatal(err)
		}
		if err := ch.QueueBind(queue, "#", b.Exchange, false, nil); err != nil {
			t.Fatal(err)
		}
		testenv.ReceiveAll(t, deliveries, events, 20*time.Second)
		testenv.Eventually(t, 10*time.Second, "ready again", func() bool { return r.Ready() == nil })
	})
}

// TestPublishRefusedBacksOff: a user that may connect but not publish
// (no write permission) has every batch's channel closed by the broker
// with 403 ACCESS_REFUSED, while connecting keeps succeeding. The relay
// must back off between attempts as for any lost link, not reconnect and
// claim again at full speed. Every refused batch costs one pause, doubling
// from 100 ms (at least half of it, with jitter) up to 1 s; a reconnect can
// also happen before the pause of the batch just refused, so 15 reconnects
// span at least 7 pauses of the 2nd to 8th failure: 2.7 s at the least.
// Without backoff they would all be pauses of the first (at most 100 ms).
func TestPublishRefusedBacksOff(t *testing.T) {
	t.Parallel()
	rmq := testenv.StartRabbitMQ(t)
	rmq.Ctl(t, "add_user", "nowrite", "nowrite")
	rmq.Ctl(t, "set_permissions", "-p", "/", "nowrite", "^$", "^$", "^$")
	o, b := testenv.NewOutbox(t), testenv.NewBrokerAt(t, rmq.URL())
	cfg := config(o, b)
	cfg.AMQP.URL = fmt.Sprintf("amqp://nowrite:nowrite@127.0.0.1:%d/", rmq.Port())
	_, logs := startObserved(t, cfg)
	events := o.WriteEvents(t, "invoice.sent", 1)

	testenv.Eventually(t, 40*time.Second, "15 reconnects after refused publishes", func() bool {
		return testenv.LinkLogs(logs, "link restored", metrics.LinkAMQP) >= 15
	})
	restores := logs.FilterMessage("link restored").FilterField(zap.String("link", metrics.LinkAMQP)).All()
	if span := restores[14].Time.Sub(restores[0].Time); span < 2500*time.Millisecond {
		t.Errorf("15 reconnects within %v: no backoff while every publish is refused", span)
	}
	refused := false
	for _, e := range logs.FilterMessage("link down").All() {
		if err, _ := e.ContextMap()["error"].(string); strings.Contains(err, "403 ACCESS_REFUSED") {
			refused = true
		}
	}
	if !refused {
		t.Error("no link down line carries the broker's 403 ACCESS_REFUSED")
	}
	if n := o.Count(t, "id = ANY($1::uuid[]) AND (dispatched_at IS NOT NULL OR dead_at IS NOT NULL OR attempts > 0)", ids(events)); n != 0 {
		t.Fatalf("%d events dispatched, dead or charged an attempt while the broker refused them", n)
	}
}
