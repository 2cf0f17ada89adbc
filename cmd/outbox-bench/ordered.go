package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/outbox-relay/outbox-relay/relay"
)

// orderedKeys is how many partition keys the ordered section spreads its
// backlog over.
const orderedKeys = 1000

// orderedSection drains the same keyed backlog four ways: one relay and
// three replicas, unordered and with ordering on, and compares the rates
// and what each costs PostgreSQL per event (issue 14's targets: one ordered
// relay at ≥ 0.8 of the unordered rate, at ≤ 2 times its database CPU).
func (b *bench) orderedSection(ctx context.Context) error {
	n := b.opts.backlog / 2
	variants := []struct {
		name     string
		replicas int
		ordering string
	}{
		{"unordered_1", 1, relay.OrderingNone},
		{"partition_key_1", 1, relay.OrderingPartitionKey},
		{"unordered_3", 3, relay.OrderingNone},
		{"partition_key_3", 3, relay.OrderingPartitionKey},
	}
	res := map[string]orderedResult{}
	for _, v := range variants {
		r, err := b.orderedDrain(ctx, n, v.replicas, v.ordering)
		if err != nil {
			return fmt.Errorf("%s: %w", v.name, err)
		}
		res[v.name] = r
		p := "ordered." + v.name
		b.out.rate(p+".rate", r.rate, "events/s",
			fmt.Sprintf("%d events over %d keys, %d replica(s), relay.ordering: %s", n, orderedKeys, v.replicas, v.ordering))
		if r.pgPerEvent >= 0 {
			b.out.line(p+".postgres_cpu_per_event", fmt.Sprintf("%.1f", r.pgPerEvent), "µs",
				"CPU of the relays' database backends, from /proc, / events")
		}
		b.out.line(p+".bench_cpu_per_event", fmt.Sprintf("%.1f", r.selfPerEvent), "µs",
			"CPU of the bench process (the relay engines and the consumer) / events")
	}
	b.out.ratio("ordered.ratio_ordered1_to_unordered1", res["partition_key_1"].rate, res["unordered_1"].rate, "one relay each; target ≥ 0.80")
	if u, o := res["unordered_1"].pgPerEvent, res["partition_key_1"].pgPerEvent; u > 0 && o >= 0 {
		b.out.ratio("ordered.postgres_cpu_ordered1_to_unordered1", o, u, "database CPU per event, one relay each; target ≤ 2")
	}
	b.out.ratio("ordered.ratio_ordered3_to_unordered1", res["partition_key_3"].rate, res["unordered_1"].rate, "ordered, 3 replicas / unordered, 1 relay")
	b.out.ratio("ordered.ratio_ordered3_to_unordered3", res["partition_key_3"].rate, res["unordered_3"].rate, "ordered, 3 replicas / unordered, 3 replicas")
	return nil
}

// orderedResult is one drain of the ordered section.
type orderedResult struct {
	rate         float64 // events/s
	pgPerEvent   float64 // µs of the relays' database backends per event, -1 if unknown
	selfPerEvent float64 // µs of the bench process per event
}

func (b *bench) orderedDrain(ctx context.Context, n, replicas int, ordering string) (orderedResult, error) {
	res := orderedResult{pgPerEvent: -1}
	if err := b.reset(ctx, false); err != nil {
		return res, err
	}
	if err := b.fill(ctx, 1, n, orderedKeys); err != nil {
		return res, err
	}
	cons, err := b.startConsumer(nil)
	if err != nil {
		return res, err
	}
	defer cons.stop()
	cfg := b.relayConfig()
	cfg.Relay.Ordering = ordering
	cpu0 := b.cpuSnapshot()
	start := time.Now()
	var relays []*inproc
	defer func() {
		for _, r := range relays {
			_ = r.stop()
		}
	}()
	for range replicas {
		r, err := b.startRelay(ctx, cfg)
		if err != nil {
			return res, err
		}
		relays = append(relays, r)
	}
	if err := cons.waitCount(ctx, int64(n), 3*time.Minute); err != nil {
		return res, err
	}
	elapsed := time.Since(start)
	cpu1 := b.cpuSnapshot()
	// The engines' backends started with them: their whole CPU time is the drain's.
	if pids, err := b.backendPIDs(ctx, b.engineAppName()); err == nil {
		if d := backendsCPU(pids); d >= 0 {
			res.pgPerEvent = float64(d.Microseconds()) / float64(n)
		}
	}
	res.selfPerEvent = float64((cpu1.self - cpu0.self).Microseconds()) / float64(n)
	res.rate = float64(n) / elapsed.Seconds()
	var errs []error
	for _, r := range relays {
		errs = append(errs, r.stop())
	}
	relays = nil
	return res, errors.Join(errs...)
}
