package main

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/outbox-relay/outbox-relay/internal/amqpconn"
)

// consumer receives from the bench queue with auto-ack, counting messages
// and, when track is set, recording each event's receive time by the event
// number in its payload.
type consumer struct {
	ch    *amqp.Channel
	tag   string
	count atomic.Int64
	track []int64 // receive time (UnixNano) by event number; nil: count only
	bad   atomic.Int64
	done  chan struct{}
}

// startConsumer empties the queue of what an earlier measurement left
// behind and consumes it from then on.
func (b *bench) startConsumer(track []int64) (*consumer, error) {
	ch, err := b.consConn.Channel()
	if err != nil {
		return nil, fmt.Errorf("consumer channel: %w", err)
	}
	if _, err := ch.QueuePurge(b.name, false); err != nil {
		ch.Close()
		return nil, fmt.Errorf("purge queue: %w", err)
	}
	c := &consumer{ch: ch, tag: "bench-" + uuid.NewString(), track: track, done: make(chan struct{})}
	deliveries, err := ch.Consume(b.name, c.tag, true, false, false, false, nil)
	if err != nil {
		ch.Close()
		return nil, fmt.Errorf("consume: %w", err)
	}
	go func() {
		defer close(c.done)
		for d := range deliveries {
			if c.track != nil {
				now := time.Now().UnixNano()
				k, ok := eventNumber(d.Body)
				if ok && k >= 0 && k < int64(len(c.track)) {
					c.track[k] = now
				} else {
					c.bad.Add(1)
				}
			}
			c.count.Add(1)
		}
	}()
	return c, nil
}

// stop cancels the subscription and waits for the delivery loop to end;
// after it, track may be read.
func (c *consumer) stop() {
	_ = c.ch.Cancel(c.tag, false)
	select {
	case <-c.done:
	case <-time.After(10 * time.Second):
	}
	_ = c.ch.Close()
	select {
	case <-c.done:
	case <-time.After(5 * time.Second):
	}
}

// waitCount waits until n messages have arrived.
func (c *consumer) waitCount(ctx context.Context, n int64, limit time.Duration) error {
	err := waitFor(ctx, limit, time.Millisecond, func() (bool, error) { return c.count.Load() >= n, nil })
	if err != nil {
		return fmt.Errorf("consumer received %d of %d: %w", c.count.Load(), n, err)
	}
	return nil
}

// payload returns an event body of size bytes carrying event number k:
// {"k":K,"p":"xxx…"}, the same shape as the bulk fill's.
func payload(k int64, size int) []byte {
	b := make([]byte, 0, size)
	b = append(b, `{"k":`...)
	b = strconv.AppendInt(b, k, 10)
	b = append(b, `,"p":"`...)
	for len(b) < size-2 {
		b = append(b, 'x')
	}
	return append(b, `"}`...)
}

// eventNumber parses the K of a payload made by payload or the bulk fill.
func eventNumber(body []byte) (int64, bool) {
	const prefix = `{"k":`
	if len(body) < len(prefix)+1 || string(body[:len(prefix)]) != prefix {
		return 0, false
	}
	var k int64
	i := len(prefix)
	for ; i < len(body) && body[i] >= '0' && body[i] <= '9'; i++ {
		k = k*10 + int64(body[i]-'0')
	}
	return k, i > len(prefix)
}

// broker measures the ceiling: publish-with-confirms of persistent messages
// shaped like the relay's into the bench's durable classic queue, no
// database, for each window of outstanding confirms. The relay publishes the
// same way, with a window of amqp.max_unconfirmed.
func (b *bench) broker(ctx context.Context) error {
	best := 0.0
	bestWindow := 0
	for _, w := range b.opts.windows {
		res, err := b.publishRun(ctx, w, b.opts.ceilTime)
		if err != nil {
			return fmt.Errorf("window %d: %w", w, err)
		}
		b.out.rate(fmt.Sprintf("broker.window_%d", w), res.rate, "msg/s",
			fmt.Sprintf("%d confirmed in %.2fs, sliding window of %d outstanding", res.n, res.elapsed.Seconds(), w))
		b.cpuLine(fmt.Sprintf("broker.window_%d.cpu", w), res.cpu0, res.cpu1, -1)
		if res.rate > best {
			best, bestWindow = res.rate, w
		}
	}
	b.ceiling, b.ceilingWindow = best, bestWindow
	b.out.rate("broker.ceiling", best, "msg/s", fmt.Sprintf("best window: %d", bestWindow))
	return nil
}

type publishResult struct {
	n          int64
	elapsed    time.Duration
	rate       float64
	cpu0, cpu1 cpuSnap
	idle       []brokerTickSample // the broker per brokerTick, nil if unknown
}

// publishRun publishes for d on a fresh connection, keeping up to window
// messages outstanding.
// A consumer drains the queue meanwhile, as in every other measurement.
func (b *bench) publishRun(ctx context.Context, window int, d time.Duration) (publishResult, error) {
	var res publishResult
	cons, err := b.startConsumer(nil)
	if err != nil {
		return res, err
	}
	defer cons.stop()
	conn, ch, err := amqpconn.Channel(b.opts.amqpURL, b.amqpConfig(ctx, b.name+"_ceiling"))
	if err != nil {
		return res, err
	}
	defer conn.Close()
	if err := ch.Confirm(false); err != nil {
		return res, fmt.Errorf("confirm mode: %w", err)
	}
	confirms := ch.NotifyPublish(make(chan amqp.Confirmation, window+16))
	returns := ch.NotifyReturn(make(chan amqp.Return, 16))
	var returned atomic.Int64
	go func() {
		for range returns {
			returned.Add(1)
		}
	}()

	body := payload(0, b.opts.payload)
	var outstanding, acked, nacked, seq int64
	confirmTimeout := 30 * time.Second
	await := func() error {
		select {
		case c, ok := <-confirms:
			if !ok {
				return errors.New("channel closed while awaiting confirms")
			}
			outstanding--
			if c.Ack {
				acked++
			} else {
				nacked++
			}
			return nil
		case <-time.After(confirmTimeout):
			return fmt.Errorf("no confirm within %s", confirmTimeout)
		case <-ctx.Done():
			return context.Cause(ctx)
		}
	}
	// publish sends the next message; settle awaits confirms until at
	// most limit messages are outstanding.
	publish := func() error {
		if err := b.publishOne(ctx, ch, body, seq); err != nil {
			return err
		}
		seq++
		outstanding++
		return nil
	}
	settle := func(limit int64) error {
		for outstanding > limit {
			if err := await(); err != nil {
				return err
			}
		}
		return nil
	}
	res.cpu0 = b.cpuSnapshot()
	idle := b.sampleBroker()
	defer idle.finish()
	start := time.Now()
	end := start.Add(d)
	for time.Now().Before(end) {
		if err := settle(int64(window) - 1); err != nil {
			return res, err
		}
		if err := publish(); err != nil {
			return res, err
		}
	}
	if err := settle(0); err != nil {
		return res, err
	}
	res.elapsed = time.Since(start)
	res.cpu1 = b.cpuSnapshot()
	res.idle = idle.finish()
	res.n = acked
	res.rate = float64(acked) / res.elapsed.Seconds()
	if nacked > 0 || returned.Load() > 0 {
		return res, fmt.Errorf("%d nacked and %d returned of %d", nacked, returned.Load(), seq)
	}
	if err := cons.waitCount(ctx, acked, 30*time.Second); err != nil {
		return res, err
	}
	return res, nil
}

// publishOne publishes a message shaped like the relay's: persistent,
// mandatory, with a message id, type, timestamp and the sequence header.
func (b *bench) publishOne(ctx context.Context, ch *amqp.Channel, body []byte, seq int64) error {
	err := ch.PublishWithContext(ctx, b.name, eventType, true, false, amqp.Publishing{
		Headers:      amqp.Table{"x-outbox-seq": seq},
		ContentType:  "application/json",
		DeliveryMode: amqp.Persistent,
		MessageId:    uuid.NewString(),
		Timestamp:    time.Now(),
		Type:         eventType,
		AppId:        "outbox-bench",
		Body:         body,
	})
	if err != nil {
		return fmt.Errorf("publish: %w", err)
	}
	return nil
}
