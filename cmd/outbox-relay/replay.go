package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/internal/ops"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/relay/rabbitmq"
)

const replayLong = `Publishes already dispatched events again, in seq order, with confirms, each
copy marked with the header x-outbox-replay (the time of the replay). They
are read, and only read, from the archive of dispatched rows
(<table>_dispatched); rows an older relay marked dispatched in place in the
outbox table are not replayed. Select with any of:
  --from-seq N --to-seq N        seq range (inclusive)
  --since T --until T            created_at range; T is RFC 3339 or an age
                                 such as 90m or 7d (that long ago)
  --type T (repeatable)          event types
  --all                          everything dispatched (no other selector;
                                 asks first on a terminal, else needs --yes)
Copies follow their rows' routes (the exchange and routing_key columns, else
amqp.exchange and the event type); --exchange X sends them all to X, each with
its routing key. --dry-run counts what would be sent. --rate N holds per event: a page is
sent in small slices (about 20 a second), never all at once. Progress (done,
rate, time left) is one rewritten line on a terminal, otherwise a line every
5 seconds and at the end.
If interrupted (Ctrl-C; a second one quits at once) or cut off by a broker
failure, it prints the command that resumes: the same selection from the
first event not confirmed. Nothing confirmed before that event is sent
again. After a broker failure, events of the failed send that the broker
confirmed after it are sent again by resuming (it says how many); consumers
drop them by message id like any duplicate.
`

const defaultReplayBatch = 500

// replayFlags are replay's flags.
type replayFlags struct {
	types                  stringList
	from, to               int64
	since, until, exchange string
	all, dryRun, yes, json bool
	rate                   float64
	batch                  int
}

func (c *cliEnv) cmdReplay(ctx context.Context, o replayFlags) error {
	sel := ops.ReplaySelection{FromSeq: o.from, ToSeq: o.to, Types: o.types}
	var err error
	if sel.Since, err = parseWhen(o.since); err != nil {
		return usagef("replay --since: %v", err)
	}
	if sel.Until, err = parseWhen(o.until); err != nil {
		return usagef("replay --until: %v", err)
	}
	selected := o.from != 0 || o.to != 0 || o.since != "" || o.until != "" || len(o.types) > 0
	switch {
	case !selected && !o.all:
		return usagef("replay: choose what to replay (--from-seq/--to-seq, --since/--until, --type) or --all")
	case selected && o.all:
		return usagef("replay: --all cannot be combined with another selector")
	case o.from < 0 || o.to < 0 || (o.to != 0 && o.to < o.from):
		return usagef("replay: --from-seq and --to-seq must be positive, with --to-seq ≥ --from-seq")
	case o.rate < 0 || math.IsNaN(o.rate) || math.IsInf(o.rate, 0):
		return usagef("replay --rate: must be 0 (unlimited) or a positive number of events per second, got %v", o.rate)
	case o.batch < 1 || o.batch > 10000:
		return usagef("replay --batch-size: must be between 1 and 10000, got %d", o.batch)
	}
	if o.all && !o.dryRun {
		if err := c.needConfirmation("replay --all", o.yes); err != nil {
			return err
		}
	}
	prefixes := []string{"postgres."}
	if !o.dryRun {
		prefixes = append(prefixes, "amqp.")
	}
	cfg, err := c.loadConfig(prefixes...)
	if err != nil {
		return err
	}
	conn, out, err := connectOutbox(ctx, cfg) // checks the table exists
	if err != nil {
		return err
	}
	conn.Close(context.WithoutCancel(ctx))
	t := out.Table()
	poolCfg, err := relay.PoolConfig(cfg.Postgres)
	if err != nil {
		return err
	}
	pool, err := pgxpool.NewWithConfig(ctx, poolCfg)
	if err != nil {
		return fmt.Errorf("connect: %s", relay.Redact(err.Error()))
	}
	defer pool.Close()
	rp := out.Replayer()
	if o.dryRun {
		n, err := rp.Count(ctx, pool, sel)
		if err != nil {
			return err
		}
		if o.json {
			return writeJSON(c.stdout, replayReport{Table: t.String(), DryRun: true, Total: n})
		}
		fmt.Fprintf(c.stdout, "dry run: %d dispatched events of %s match; nothing was sent\n", n, t)
		return nil
	}
	if o.all && !o.yes {
		n, err := rp.Count(ctx, pool, sel)
		if err != nil {
			return err
		}
		to := o.exchange
		if to == "" {
			to = cfg.AMQP.Exchange
		}
		if err := c.confirm(fmt.Sprintf("replay all %d dispatched events of %s to exchange %q?", n, t, to), "nothing was sent"); err != nil {
			return err
		}
	}

	amqpCfg := cfg.AMQP
	if o.exchange != "" {
		// Never declared, only checked: a mistyped name must not leave a
		// stray durable exchange behind with the copies lost in it.
		noDeclare := false
		amqpCfg.Exchange, amqpCfg.DeclareExchange = o.exchange, &noDeclare
	}
	log := newLogger(cfg.Log, c.stderr)
	// Replay waits for each batch before sending the next: one pending batch.
	pub, err := rabbitmq.New(amqpCfg, rabbitmq.Options{Logger: log.Named("replay"), Window: o.batch, Batches: 1})
	if err != nil {
		return err
	}
	defer pub.Close()
	if err := pub.Connect(ctx); err != nil {
		return fmt.Errorf("broker: %w (nothing was sent)", err)
	}
	// A second SIGINT/SIGTERM after the first kills the process at once.
	context.AfterFunc(ctx, c.stopSignals)
	pr := newProgress(c.stderr, isTerminal(c.stderr))
	p, err := rp.Replay(ctx, pool, pub, sel, ops.ReplayOptions{
		BatchSize: o.batch,
		Rate:      o.rate,
		Progress:  pr.update,
		// --exchange takes every copy, including those of rows routed to
		// another exchange.
		OneExchange: o.exchange != "",
	})
	pr.finish(p)
	if o.json {
		rep := replayReport{Table: t.String(), Exchange: amqpCfg.Exchange, Total: p.Total, Replayed: p.Done,
			Seconds: p.Elapsed.Seconds(), Complete: err == nil}
		if jerr := writeJSON(c.stdout, rep); jerr != nil {
			return jerr
		}
	} else {
		fmt.Fprintf(c.stdout, "replayed %d of %d events to exchange %q in %s\n", p.Done, p.Total, amqpCfg.Exchange, p.Elapsed.Round(time.Millisecond))
	}
	if err == nil {
		return nil
	}
	resume := resumeCommand(c.configPath, sel, p.Resume, o.exchange, o.rate, o.batch)
	if errors.Is(err, context.Canceled) {
		return fmt.Errorf("replay interrupted after %d of %d events (every selected event before seq %d was confirmed); resume with:\n  %s",
			p.Done, p.Total, p.Resume, resume)
	}
	again := ""
	if p.Resent > 0 {
		again = fmt.Sprintf("\n%d later events of the failed send were confirmed: resuming sends them again (consumers drop them by message id)", p.Resent)
	}
	return fmt.Errorf("%w%s\nnothing before seq %d is sent again; resume with:\n  %s", err, again, p.Resume, resume)
}

// resumeCommand is the command line that continues an interrupted replay:
// the same selection and options from seq from on. Ages (--since 7d) are
// given as the times they stood for, so the command means the same later;
// --all becomes --from-seq alone, which selects the same events.
func resumeCommand(configPath string, sel ops.ReplaySelection, from int64, exchange string, rate float64, batch int) string {
	args := []string{"outbox-relay", "replay"}
	if configPath != "" {
		if abs, err := filepath.Abs(configPath); err == nil {
			configPath = abs
		}
		args = append(args, "--config", configPath)
	}
	args = append(args, "--from-seq", strconv.FormatInt(from, 10))
	if sel.ToSeq != 0 {
		args = append(args, "--to-seq", strconv.FormatInt(sel.ToSeq, 10))
	}
	if !sel.Since.IsZero() {
		args = append(args, "--since", sel.Since.UTC().Format(time.RFC3339Nano))
	}
	if !sel.Until.IsZero() {
		args = append(args, "--until", sel.Until.UTC().Format(time.RFC3339Nano))
	}
	for _, t := range sel.Types {
		args = append(args, "--type", t)
	}
	if exchange != "" {
		args = append(args, "--exchange", exchange)
	}
	if rate > 0 {
		args = append(args, "--rate", strconv.FormatFloat(rate, 'g', -1, 64))
	}
	if batch != defaultReplayBatch {
		args = append(args, "--batch-size", strconv.Itoa(batch))
	}
	for i, a := range args {
		args[i] = shellQuote(a)
	}
	return strings.Join(args, " ")
}

var shellSafe = regexp.MustCompile(`^[A-Za-z0-9_./:@%+,=-]+$`)

// shellQuote quotes s for a POSIX shell when it needs it.
func shellQuote(s string) string {
	if shellSafe.MatchString(s) {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// progress prints a replay's progress: on a terminal one line rewritten
// every 100ms at most, otherwise a plain line every 5 seconds at most (a
// short replay prints only its final state, which finish always prints).
type progress struct {
	w       io.Writer
	live    bool
	every   time.Duration
	last    time.Time
	printed ops.ReplayProgress
}

func newProgress(w io.Writer, live bool) *progress {
	every := 5 * time.Second
	if live {
		every = 100 * time.Millisecond
	}
	return &progress{w: w, live: live, every: every, last: time.Now()}
}

func (pr *progress) update(p ops.ReplayProgress) {
	if now := time.Now(); now.Sub(pr.last) >= pr.every {
		pr.last = now
		pr.printed = p
		progressLine(pr.w, p, pr.live)
	}
}

func (pr *progress) finish(p ops.ReplayProgress) {
	if p != pr.printed {
		progressLine(pr.w, p, pr.live)
	}
	if pr.live {
		fmt.Fprintln(pr.w)
	}
}

// progressLine prints one progress report: done of total, the average rate
// since the start and the time left at that rate. On a terminal it rewrites
// the current line.
func progressLine(w io.Writer, p ops.ReplayProgress, live bool) {
	rate := float64(p.Done) / max(p.Elapsed.Seconds(), 1e-3)
	eta := "-"
	if rate > 0 && p.Total > p.Done {
		eta = formatAge(time.Duration(float64(p.Total-p.Done) / rate * float64(time.Second)))
	}
	pct := 100.0
	if p.Total > 0 {
		pct = 100 * float64(p.Done) / float64(p.Total)
	}
	last := "-"
	if p.Done > 0 {
		last = strconv.FormatInt(p.LastSeq, 10)
	}
	line := fmt.Sprintf("replay: %d/%d (%.1f%%) %.0f events/s, ETA %s, last seq %s", p.Done, p.Total, pct, rate, eta, last)
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

// replayReport is what replay prints with --json.
type replayReport struct {
	Table    string  `json:"table"`
	Exchange string  `json:"exchange,omitempty"`
	DryRun   bool    `json:"dry_run"`
	Total    int64   `json:"total"`    // selected events
	Replayed int64   `json:"replayed"` // confirmed copies
	Seconds  float64 `json:"seconds"`
	Complete bool    `json:"complete"` // false: interrupted or failed, see stderr for the resume command
}
