package main

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/outbox-relay/outbox-relay/relay"
)

// drainAlt is a relay configuration the drain A/B compares with the
// default: -drain-alt max_conns=6,batch_size=1000,max_unconfirmed=250.
type drainAlt struct {
	text           string
	maxConns       int32
	batchSize      int
	maxUnconfirmed int
}

const drainAltKeys = "max_conns, batch_size, max_unconfirmed"

func parseDrainAlt(s string) (drainAlt, error) {
	alt := drainAlt{text: s}
	for _, kv := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(kv), "=")
		n, err := strconv.Atoi(v)
		if !ok || err != nil || n < 1 {
			return alt, fmt.Errorf("%q: want key=positive integer, keys %s", kv, drainAltKeys)
		}
		switch k {
		case "max_conns":
			alt.maxConns = int32(n)
		case "batch_size":
			alt.batchSize = n
		case "max_unconfirmed":
			alt.maxUnconfirmed = n
		default:
			return alt, fmt.Errorf("unknown key %q (keys: %s)", k, drainAltKeys)
		}
	}
	return alt, nil
}

func (a drainAlt) apply(c *relay.Config) {
	c.Postgres.MaxConns = cmp.Or(a.maxConns, c.Postgres.MaxConns)
	c.Relay.BatchSize = cmp.Or(a.batchSize, c.Relay.BatchSize)
	c.AMQP.MaxUnconfirmed = cmp.Or(a.maxUnconfirmed, c.AMQP.MaxUnconfirmed)
}

// drainAB alternates drains of the default configuration (A) and -drain-alt
// (B), ABBA ABBA…, each beside its own adjacent ceiling, and prints each
// drain and the medians: on a shared machine only a paired comparison made
// within minutes says anything.
func (b *bench) drainAB(ctx context.Context, mode string) error {
	ratios := map[string][]float64{}
	for i := range b.opts.drainRounds {
		order := []string{"a", "b"}
		if i%2 == 1 {
			order = []string{"b", "a"}
		}
		for _, v := range order {
			var tweak func(*relay.Config)
			if v == "b" {
				tweak = b.opts.drainAlt.apply
			}
			d, err := b.drainBetweenCeilings(ctx, mode, tweak)
			if err != nil {
				return fmt.Errorf("%s round %d: %w", v, i+1, err)
			}
			res, ceil := d.res, d.ceiling()
			r := res.rate / ceil.rate
			ratios[v] = append(ratios[v], r)
			p := fmt.Sprintf("drain.%s.ab.%s.round_%d", mode, v, i+1)
			b.out.line(p+".ratio_to_ceiling_adjacent", fmt.Sprintf("%.2f", r), "",
				fmt.Sprintf("%.0f events/s, ceiling %.0f msg/s; load %s", res.rate, ceil.rate, loadavg()))
			b.perEventLines(p, res, ceil)
		}
	}
	for _, v := range []string{"a", "b"} {
		what := "default"
		if v == "b" {
			what = b.opts.drainAlt.text
		}
		rs := slices.Clone(ratios[v])
		slices.Sort(rs)
		b.out.line(fmt.Sprintf("drain.%s.ab.%s.median_ratio", mode, v), fmt.Sprintf("%.2f", rs[len(rs)/2]), "",
			fmt.Sprintf("%s; all: %.2f", what, ratios[v]))
	}
	return nil
}
