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

// orderedSection drains the same keyed backlog three ways: one unordered
// relay, three unordered replicas, and three replicas with ordering on
// (issue 4's ratio: ordered with 3 replicas against unordered).
func (b *bench) orderedSection(ctx context.Context) error {
	n := b.opts.backlog / 2
	variants := []struct {
		name     string
		replicas int
		ordering string
	}{
		{"unordered_1", 1, relay.OrderingNone},
		{"unordered_3", 3, relay.OrderingNone},
		{"partition_key_3", 3, relay.OrderingPartitionKey},
	}
	rates := map[string]float64{}
	for _, v := range variants {
		rate, err := b.orderedDrain(ctx, n, v.replicas, v.ordering)
		if err != nil {
			return fmt.Errorf("%s: %w", v.name, err)
		}
		rates[v.name] = rate
		b.out.rate("ordered."+v.name+".rate", rate, "events/s",
			fmt.Sprintf("%d events over %d keys, %d replica(s), relay.ordering: %s", n, orderedKeys, v.replicas, v.ordering))
	}
	b.out.ratio("ordered.ratio_ordered3_to_unordered1", rates["partition_key_3"], rates["unordered_1"], "ordered, 3 replicas / unordered, 1 relay")
	b.out.ratio("ordered.ratio_ordered3_to_unordered3", rates["partition_key_3"], rates["unordered_3"], "ordered, 3 replicas / unordered, 3 replicas")
	return nil
}

func (b *bench) orderedDrain(ctx context.Context, n, replicas int, ordering string) (float64, error) {
	if err := b.reset(ctx, false); err != nil {
		return 0, err
	}
	q := `INSERT INTO ` + b.table.Quoted() + ` (event_type, partition_key, payload)
SELECT $1, 'k' || (g % $4), convert_to(rpad('{"k":' || g || ',"p":"', $3::int - 2, 'x') || '"}', 'UTF8')
FROM generate_series(1, $2::bigint) g`
	if _, err := b.pool.Exec(ctx, q, eventType, n, b.opts.payload, orderedKeys); err != nil {
		return 0, fmt.Errorf("fill keyed backlog: %w", err)
	}
	if _, err := b.pool.Exec(ctx, "ANALYZE "+b.table.Quoted()); err != nil {
		return 0, err
	}
	if err := b.purge(); err != nil {
		return 0, err
	}
	cons, err := b.startConsumer(nil)
	if err != nil {
		return 0, err
	}
	defer cons.stop()
	cfg := b.relayConfig()
	cfg.Relay.Ordering = ordering
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
			return 0, err
		}
		relays = append(relays, r)
	}
	if err := cons.waitCount(ctx, int64(n), 3*time.Minute); err != nil {
		return 0, err
	}
	elapsed := time.Since(start)
	var errs []error
	for _, r := range relays {
		errs = append(errs, r.stop())
	}
	relays = nil
	return float64(n) / elapsed.Seconds(), errors.Join(errs...)
}
