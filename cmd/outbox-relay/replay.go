package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/relay"
)

const replayUsage = `Usage:
  outbox-relay replay [selection] [--exchange X] [--rate N] [--batch-size N] [--dry-run]

Publishes already dispatched events again, in seq order, with confirms, each
copy marked with the header x-outbox-replay (the time of the replay). The
outbox table is only read. Select with any of:
  --from-seq N --to-seq N        seq range (inclusive)
  --since T --until T            created_at range; T is RFC 3339 or an age
                                 such as 90m or 7d (that long ago)
  --type T (repeatable)          event types
  --all                          everything dispatched (no other selector)
--dry-run counts what would be sent. On a terminal a progress line shows the
rate and the time left. If interrupted (Ctrl-C) or the broker fails, it
prints the --from-seq to resume from; nothing confirmed is sent twice by
resuming.
`

func (c *cliEnv) cmdReplay(ctx context.Context, args []string) error {
	fs, path := c.flags("replay")
	fs.Usage = func() {
		fmt.Fprint(c.stderr, replayUsage, "\nFlags:\n")
		fs.PrintDefaults()
	}
	var types stringList
	fs.Var(&types, "type", "replay only this event type (repeatable)")
	from := fs.Int64("from-seq", 0, "first seq to replay")
	to := fs.Int64("to-seq", 0, "last seq to replay (0: no limit)")
	since := fs.String("since", "", "created at or after: RFC 3339 time or an age such as 24h or 7d")
	until := fs.String("until", "", "created before: RFC 3339 time or an age")
	all := fs.Bool("all", false, "replay every dispatched event")
	exchange := fs.String("exchange", "", "publish the copies to this exchange instead of amqp.exchange")
	rate := fs.Float64("rate", 0, "most events per second (0: as fast as confirms allow)")
	batch := fs.Int("batch-size", 500, "events read and published per round")
	dryRun := fs.Bool("dry-run", false, "only count the selected events")
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usagef("replay: unexpected argument %q", fs.Arg(0))
	}
	sel := relay.ReplaySelection{FromSeq: *from, ToSeq: *to, Types: types}
	var err error
	if sel.Since, err = parseWhen(*since); err != nil {
		return usagef("replay --since: %v", err)
	}
	if sel.Until, err = parseWhen(*until); err != nil {
		return usagef("replay --until: %v", err)
	}
	selected := *from != 0 || *to != 0 || *since != "" || *until != "" || len(types) > 0
	switch {
	case !selected && !*all:
		return usagef("replay: choose what to replay (--from-seq/--to-seq, --since/--until, --type) or --all")
	case selected && *all:
		return usagef("replay: --all cannot be combined with another selector")
	case *from < 0 || *to < 0 || (*to != 0 && *to < *from):
		return usagef("replay: --from-seq and --to-seq must be positive, with --to-seq ≥ --from-seq")
	case *rate < 0:
		return usagef("replay --rate: must be 0 (unlimited) or positive, got %v", *rate)
	case *batch < 1 || *batch > 10000:
		return usagef("replay --batch-size: must be between 1 and 10000, got %d", *batch)
	}
	prefixes := []string{"postgres."}
	if !*dryRun {
		prefixes = append(prefixes, "amqp.")
	}
	cfg, err := c.loadConfig(*path, prefixes...)
	if err != nil {
		return err
	}
	conn, _, t, err := connectOutbox(ctx, cfg) // checks the table exists
	if err != nil {
		return err
	}
	conn.Close(context.WithoutCancel(ctx))
	pool, err := pgxpool.New(ctx, cfg.Postgres.DSN)
	if err != nil {
		return fmt.Errorf("connect: %s", relay.Redact(err.Error()))
	}
	defer pool.Close()
	rp, err := relay.NewReplayer(t.Schema, t.Name)
	if err != nil {
		return err
	}
	if *dryRun {
		n, err := rp.Count(ctx, pool, sel)
		if err != nil {
			return err
		}
		fmt.Fprintf(c.stdout, "dry run: %d dispatched events of %s match; nothing was sent\n", n, t)
		return nil
	}

	amqpCfg := cfg.AMQP
	if *exchange != "" {
		amqpCfg.Exchange = *exchange
	}
	log := newLogger(cfg.Log, c.stderr)
	pub := relay.NewAMQPPublisher(amqpCfg, *batch, log.Named("replay"))
	defer pub.Close()
	if err := pub.Connect(ctx); err != nil {
		return fmt.Errorf("broker: %w", err)
	}
	live := isTerminal(c.stderr)
	p, err := rp.Replay(ctx, pool, pub, sel, relay.ReplayOptions{
		BatchSize: *batch,
		Rate:      *rate,
		Progress:  func(p relay.ReplayProgress) { progressLine(c.stderr, p, live) },
	})
	if live {
		fmt.Fprintln(c.stderr)
	}
	fmt.Fprintf(c.stdout, "replayed %d of %d events to exchange %q in %s\n", p.Done, p.Total, amqpCfg.Exchange, p.Elapsed.Round(time.Millisecond))
	if err != nil {
		resume := fmt.Sprintf("resume with --from-seq %d (and the same other selectors)", p.LastSeq+1)
		if errors.Is(err, context.Canceled) {
			return fmt.Errorf("interrupted after seq %d: %s", p.LastSeq, resume)
		}
		return fmt.Errorf("%w; %s", err, resume)
	}
	return nil
}

// progressLine reports a replay's progress: one rewritten line on a
// terminal, a plain line per batch otherwise.
func progressLine(w io.Writer, p relay.ReplayProgress, live bool) {
	rate := float64(p.Done) / max(p.Elapsed.Seconds(), 1e-3)
	eta := "-"
	if rate > 0 && p.Total > p.Done {
		eta = formatAge(time.Duration(float64(p.Total-p.Done) / rate * float64(time.Second)))
	}
	pct := 100.0
	if p.Total > 0 {
		pct = 100 * float64(p.Done) / float64(p.Total)
	}
	line := fmt.Sprintf("replay: %d/%d (%.1f%%) %.0f events/s, ETA %s, last seq %d", p.Done, p.Total, pct, rate, eta, p.LastSeq)
	if live {
		fmt.Fprintf(w, "\r\033[K%s", line)
		return
	}
	fmt.Fprintln(w, line)
}

// parseWhen parses an RFC 3339 time or an age ("90m", "7d": that long ago);
// "" is the zero time.
func parseWhen(s string) (time.Time, error) {
	if s == "" {
		return time.Time{}, nil
	}
	if t, err := time.Parse(time.RFC3339, s); err == nil {
		return t, nil
	}
	age, err := parseAge(s)
	if err != nil {
		return time.Time{}, fmt.Errorf("%q is neither an RFC 3339 time (2026-11-23T09:00:00Z) nor an age such as 90m or 7d", s)
	}
	return time.Now().Add(-age), nil
}
