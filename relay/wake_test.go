package relay_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
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

// TestNotifyWakesIdleRelay: with a 10 s fallback poll, an event committed
// to an idle relay is on the queue within 1 s because a NOTIFY woke the
// relay, and again after the LISTEN connection was killed.
func TestNotifyWakesIdleRelay(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	deliveries := b.Consume(t, b.Queue(t, "#", nil))
	ctx := context.Background()
	if _, err := o.Pool.Exec(ctx, "ALTER TABLE "+o.Table.Quoted()+" ENABLE TRIGGER "+o.Table.Local("notify")); err != nil {
		t.Fatal(err)
	}
	cfg := config(o, b)
	cfg.Wake.Mode = relay.WakeNotify
	cfg.Wake.PollInterval = 10 * time.Second // a poll cannot explain a sub-second delivery
	// Only the claim loop uses the relay's pool after start (the stats loop
	// reads once, at start, and the cleaner is off), so the last statement
	// of the pool's connections tells what the claim loop did last.
	cfg.Relay.StatsInterval = time.Hour
	off := false
	cfg.Retention.Enabled = &off
	r := start(t, cfg)
	wakeups := func(src string) float64 { return value(t, r.Metrics.Wakeups.WithLabelValues(src)) }

	// listener returns the LISTEN connection's pid and when it started.
	listener := func() (pid int32, since time.Time) {
		t.Helper()
		err := o.Pool.QueryRow(ctx, `SELECT pid, backend_start FROM pg_stat_activity WHERE query = $1
			ORDER BY backend_start DESC LIMIT 1`, "LISTEN "+pgx.Identifier{o.Table.Channel()}.Sanitize()).Scan(&pid, &since)
		if errors.Is(err, pgx.ErrNoRows) {
			return 0, time.Time{}
		}
		if err != nil {
			t.Fatal(err)
		}
		return pid, since
	}
	// awaitIdle waits until the claim loop has taken the wake-up that
	// follows the LISTEN connection's (re)connect and then probed the table
	// and found it empty: a probe that ran after the connection started and
	// has finished. The loop is then in its 10 s wait.
	probe := "SELECT EXISTS (SELECT 1 FROM " + o.Table.Quoted() + " WHERE %"
	awaitIdle := func(reconnectWakeups float64, since time.Time) {
		t.Helper()
		testenv.Eventually(t, 15*time.Second, "relay idle after the LISTEN connection's wake-up", func() bool {
			if r.Ready() != nil || wakeups(metrics.WakeReconnect) < reconnectWakeups {
				return false
			}
			var probed bool
			err := o.Pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_stat_activity
				WHERE pid <> pg_backend_pid() AND state = 'idle' AND query LIKE $1 AND query_start > $2)`, probe, since).Scan(&probed)
			if err != nil {
				t.Fatal(err)
			}
			return probed
		})
	}
	deliverByNotify := func(label string) {
		t.Helper()
		notified, polled, reconnected := wakeups(metrics.WakeNotify), wakeups(metrics.WakePoll), wakeups(metrics.WakeReconnect)
		ev := outbox.NewEvent("lesson.published", []byte(`{"`+label+`":true}`))
		w, _ := outbox.NewWriter(o.Schema, o.Table.Name)
		if err := pgx.BeginFunc(ctx, o.Pool, func(tx pgx.Tx) error { return w.Write(ctx, tx, ev) }); err != nil {
			t.Fatal(err)
		}
		committed := time.Now()
		select {
		case d := <-deliveries:
			if d.MessageId != ev.ID.String() {
				t.Fatalf("%s: got message %s, want %s", label, d.MessageId, ev.ID)
			}
			t.Logf("%s: committed → received in %s", label, time.Since(committed))
		case <-time.After(time.Second):
			t.Fatalf("%s: event not delivered within 1s (NOTIFY did not wake the relay)", label)
		}
		// The claim loop counts a wake-up before it claims, so the count
		// is in by the time the event arrived.
		if n := wakeups(metrics.WakeNotify); n <= notified {
			t.Fatalf("%s: delivered, but outbox_relay_wakeups_total{source=\"notify\"} stayed at %v", label, n)
		}
		if p, rc := wakeups(metrics.WakePoll), wakeups(metrics.WakeReconnect); p != polled || rc != reconnected {
			t.Fatalf("%s: wake-ups by poll %v → %v, by reconnect %v → %v; want only notify", label, polled, p, reconnected, rc)
		}
	}

	var (
		pid   int32
		since time.Time
	)
	testenv.Eventually(t, 10*time.Second, "LISTEN connection", func() bool { pid, since = listener(); return pid != 0 })
	awaitIdle(1, since)
	deliverByNotify("first")

	if _, err := o.Pool.Exec(ctx, "SELECT pg_terminate_backend($1)", pid); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 10*time.Second, "listen link restored on a new connection", func() bool {
		p, s := listener()
		if p == 0 || p == pid || value(t, r.Metrics.Reconnects.WithLabelValues(metrics.LinkListen)) < 1 ||
			value(t, r.Metrics.LinkUp.WithLabelValues(metrics.LinkListen)) != 1 {
			return false
		}
		pid, since = p, s
		return true
	})
	awaitIdle(2, since)
	deliverByNotify("after-reconnect")
}

// TestWakeModeTriggerMismatchWarns: at start the relay warns when wake.mode
// and the table's NOTIFY trigger disagree, in either direction, naming the
// command that fixes it, and says nothing when they agree.
func TestWakeModeTriggerMismatchWarns(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		mode    string
		trigger bool
		want    string // snippet of the warning; "" for none
	}{
		{relay.WakeNotify, false, "wake.mode is notify but the table's NOTIFY trigger is disabled"},
		{relay.WakePoll, true, "NOTIFY trigger is enabled but wake.mode is poll"},
		{relay.WakeNotify, true, ""},
		{relay.WakePoll, false, ""},
	} {
		t.Run(fmt.Sprintf("mode=%s/trigger=%v", c.mode, c.trigger), func(t *testing.T) {
			t.Parallel()
			o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
			if c.trigger {
				if _, err := o.Pool.Exec(context.Background(), "ALTER TABLE "+o.Table.Quoted()+" ENABLE TRIGGER "+o.Table.Local("notify")); err != nil {
					t.Fatal(err)
				}
			}
			cfg := config(o, b)
			cfg.Wake.Mode = c.mode
			core, logs := observer.New(zapcore.InfoLevel)
			r := startLogged(t, cfg, zap.New(zapcore.NewTee(core, zaptest.NewLogger(t).Core())))
			// The schema check sets the postgres link up once it is done.
			testenv.Eventually(t, 20*time.Second, "schema checked", func() bool {
				return value(t, r.Metrics.LinkUp.WithLabelValues(metrics.LinkPostgres)) == 1
			})
			warns := logs.FilterLevelExact(zapcore.WarnLevel).FilterMessageSnippet("NOTIFY trigger").All()
			if c.want == "" {
				if len(warns) != 0 {
					t.Fatalf("wake.mode and trigger agree, yet the relay warned: %q", warns[0].Message)
				}
				return
			}
			if len(warns) != 1 {
				t.Fatalf("%d warnings about the NOTIFY trigger, want 1: %v", len(warns), warns)
			}
			fix := "outbox-relay notify disable"
			if c.mode == relay.WakeNotify {
				fix = "outbox-relay notify enable"
			}
			if w := warns[0]; !strings.Contains(w.Message, c.want) || !strings.Contains(w.Message, fix) || w.LoggerName != "relay" {
				t.Fatalf("warning %q from logger %q; want it to say %q and name %q", w.Message, w.LoggerName, c.want, fix)
			}
		})
	}
}

// TestFailedPublishStaysPending: rows whose publish was nacked or returned
// stay pending with attempts and last_error, while the good row of the same
// batch is dispatched.
func TestFailedPublishStaysPending(t *testing.T) {
	t.Parallel()
	o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
	b.Queue(t, "good.#", nil)
	// A queue that refuses everything: publishes routed to it are nacked.
	b.Queue(t, "full.#", amqp.Table{"x-max-length": int32(0), "x-overflow": "reject-publish"})
	cfg := config(o, b)
	cfg.Relay.RetryMinBackoff = time.Hour // no retry during the test
	cfg.Relay.RetryMaxBackoff = time.Hour
	w, _ := outbox.NewWriter(o.Schema, o.Table.Name)
	ctx := context.Background()
	good := outbox.NewEvent("good.event", []byte(`{}`))
	nacked := outbox.NewEvent("full.event", []byte(`{}`))
	returned := outbox.NewEvent("nobody.listens", []byte(`{}`))
	if err := pgx.BeginFunc(ctx, o.Pool, func(tx pgx.Tx) error { return w.Write(ctx, tx, good, nacked, returned) }); err != nil {
		t.Fatal(err)
	}
	start(t, cfg)
	testenv.Eventually(t, 20*time.Second, "both failures recorded", func() bool {
		return o.Count(t, "attempts = 1 AND last_error IS NOT NULL") == 2
	})
	check := func(ev outbox.Event, wantErr string) {
		t.Helper()
		var (
			attempts     int
			lastErr      *string
			dispatched   bool
			availableNow bool
		)
		err := o.Pool.QueryRow(ctx, `SELECT attempts, last_error, dispatched_at IS NOT NULL, available_at <= now()
			FROM `+o.Rows()+` o WHERE id = $1`, ev.ID).Scan(&attempts, &lastErr, &dispatched, &availableNow)
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case wantErr == "" && (!dispatched || attempts != 0):
			t.Fatalf("%s: dispatched=%v attempts=%d, want dispatched at the first attempt", ev.Type, dispatched, attempts)
		case wantErr != "" && (dispatched || attempts != 1 || lastErr == nil || !strings.HasPrefix(*lastErr, wantErr) || availableNow):
			t.Fatalf("%s: dispatched=%v attempts=%d last_error=%v due now=%v; want pending, 1 attempt, %q..., retry later",
				ev.Type, dispatched, attempts, deref(lastErr), availableNow, wantErr)
		}
	}
	testenv.Eventually(t, 10*time.Second, "good event dispatched", func() bool {
		return o.Count(t, "id = $1 AND dispatched_at IS NOT NULL", good.ID) == 1
	})
	check(good, "")
	check(nacked, "nack")
	check(returned, "unroutable")
}

func deref(s *string) string {
	if s == nil {
		return "<nil>"
	}
	return *s
}

// TestLingerUnderHeavyFlow: in poll mode, the wait after a short batch is
// wake.min_interval while rows are claimed slower than wake.linger_above,
// and wake.linger once they come faster, so that batches grow. The same
// steady flow of 200 events/s (one per transaction) is below the threshold
// for one relay and above it for the other; the one that lingers claims
// several times more rows per batch, and both deliver every event.
func TestLingerUnderHeavyFlow(t *testing.T) {
	t.Parallel()
	const (
		events = 300
		every  = 5 * time.Millisecond
		linger = 500 * time.Millisecond
	)
	meanBatch := func(t *testing.T, lingerAbove int) float64 {
		o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
		deliveries := b.Consume(t, b.Queue(t, "#", nil))
		cfg := config(o, b)
		cfg.Wake.PollInterval = time.Second
		cfg.Wake.Linger = linger
		cfg.Wake.LingerAbove = lingerAbove
		r := start(t, cfg)
		testenv.Eventually(t, 20*time.Second, "relay ready", func() bool { return r.Ready() == nil })
		w, _ := outbox.NewWriter(o.Schema, o.Table.Name)
		ctx := context.Background()
		tick := time.NewTicker(every)
		defer tick.Stop()
		for i := range events {
			ev := outbox.NewEvent("lesson.published", fmt.Appendf(nil, `{"n":%d}`, i))
			if err := pgx.BeginFunc(ctx, o.Pool, func(tx pgx.Tx) error { return w.Write(ctx, tx, ev) }); err != nil {
				t.Fatal(err)
			}
			<-tick.C
		}
		testenv.Receive(t, deliveries, events, 30*time.Second)
		var pb dtoMetric
		if err := r.Metrics.BatchSize.Write(&pb.Metric); err != nil {
			t.Fatal(err)
		}
		h := pb.GetHistogram()
		mean := h.GetSampleSum() / float64(h.GetSampleCount())
		t.Logf("linger_above %d/s: %d batches of mean %.1f rows", lingerAbove, h.GetSampleCount(), mean)
		return mean
	}
	var quick, lingering float64
	t.Run("below threshold", func(t *testing.T) { t.Parallel(); quick = meanBatch(t, 100000) })
	t.Run("above threshold", func(t *testing.T) { t.Parallel(); lingering = meanBatch(t, 50) })
	t.Cleanup(func() {
		// 200/s claimed every 2 ms plus a round trip gives a few rows per
		// batch; lingering 500 ms between claims gives batches of about 100 once
		// the flow is measured (the first claims, before that, take a row each).
		if t.Failed() {
			return
		}
		if quick > 10 {
			t.Errorf("below linger_above: mean batch %.1f rows, want a few (claims every min_interval)", quick)
		}
		if lingering < 3*quick || lingering < 15 {
			t.Errorf("above linger_above: mean batch %.1f rows against %.1f below it, want several times more", lingering, quick)
		}
	})
}
