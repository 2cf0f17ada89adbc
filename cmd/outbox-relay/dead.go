package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"
	"unicode/utf8"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/internal/config"
	"github.com/outbox-relay/outbox-relay/internal/ops"
	"github.com/outbox-relay/outbox-relay/relay"
)

const deadLong = `A dead event is one the relay parked (dead_at set) after relay.max_attempts
failed publishes or a permanent failure; it is never claimed again on its own.

  list   shows dead events, newest first.
  retry  makes them due again: attempts 0, dead_at cleared, available_at now;
         last_error is kept until the next failure. In ordered mode a
         retried event follows the later events of its key that were already
         published. A relay in wake.mode notify is woken at once. With --id
         it exits 1 if an id was not retried, saying why (not found, not dead).
  purge  deletes dead events that died longer ago than --older-than.

AGE is a Go duration (90m, 72h) or a number of days (7d, also 1d12h).
--type and --id may be repeated. Retry --type/--all and purge act on many
rows: on a terminal they show the count and ask; otherwise they need --yes.`

type deadListFlags struct {
	types                stringList
	olderThan, newerThan ageFlag
	limit                int
	json, payload        bool
}

type deadRetryFlags struct {
	ids            idList
	types          stringList
	all, yes, json bool
}

type deadPurgeFlags struct {
	olderThan ageFlag
	types     stringList
	yes, json bool
}

// deadActionReport is what dead retry and purge print with --json.
type deadActionReport struct {
	Retried *int        `json:"retried,omitempty"`
	Purged  *int        `json:"purged,omitempty"`
	IDs     []uuid.UUID `json:"ids,omitempty"` // retry: the events made due again
}

// reportCount prints how many dead events verb ("retried", "purged") hit.
func (c *cliEnv) reportCount(asJSON bool, past string, n int, ids []uuid.UUID) error {
	if !asJSON {
		fmt.Fprintf(c.stdout, "%s %d dead events\n", past, n)
		return nil
	}
	rep := deadActionReport{IDs: ids}
	if past == "retried" {
		rep.Retried = &n
		if rep.IDs == nil {
			rep.IDs = []uuid.UUID{}
		}
	} else {
		rep.Purged = &n
	}
	return writeJSON(c.stdout, rep)
}

// deadRow is one dead event, as dead list --json prints it.
type deadRow struct {
	Seq           int64           `json:"seq"`
	ID            uuid.UUID       `json:"id"`
	EventType     string          `json:"event_type"`
	PartitionKey  *string         `json:"partition_key"`
	ContentType   string          `json:"content_type"`
	Headers       json.RawMessage `json:"headers"`
	CorrelationID *string         `json:"correlation_id"`
	CreatedAt     time.Time       `json:"created_at"`
	AvailableAt   time.Time       `json:"available_at"`
	Attempts      int             `json:"attempts"`
	LastError     *string         `json:"last_error"`
	DeadAt        time.Time       `json:"dead_at"`
	AgeSeconds    float64         `json:"age_seconds"`
	// With --payload, exactly one of these: the payload itself when it is
	// valid UTF-8 JSON (re-encoded compactly), otherwise its exact bytes in
	// base64.
	Payload       json.RawMessage `json:"payload,omitempty"`
	PayloadBase64 []byte          `json:"payload_base64,omitempty"`
}

func (c *cliEnv) deadList(ctx context.Context, o deadListFlags) error {
	if o.limit < 1 {
		return usagef("dead list --limit: must be at least 1, got %d", o.limit)
	}
	if o.payload && !o.json {
		return usagef("dead list --payload: only with --json")
	}
	if o.olderThan.set && o.newerThan.set && o.newerThan.d <= o.olderThan.d {
		return usagef("dead list: --newer-than (%s) must be longer than --older-than (%s), or nothing matches", o.newerThan.d, o.olderThan.d)
	}
	filter := ops.DeadFilter{Types: o.types, OlderThan: o.olderThan.d, NewerThan: o.newerThan.d}

	conn, out, err := c.openOutbox(ctx)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))

	events, err := out.ListDead(ctx, conn, filter, o.payload, o.limit)
	if err != nil {
		return err
	}
	list := make([]deadRow, 0, len(events))
	for _, e := range events {
		r := deadRow{Seq: e.Seq, ID: e.ID, EventType: e.EventType, PartitionKey: e.PartitionKey,
			ContentType: e.ContentType, Headers: e.Headers, CorrelationID: e.CorrelationID,
			CreatedAt: e.CreatedAt, AvailableAt: e.AvailableAt, Attempts: e.Attempts,
			LastError: e.LastError, DeadAt: e.DeadAt, AgeSeconds: e.AgeSeconds}
		if o.payload {
			if utf8.Valid(e.Body) && json.Valid(e.Body) {
				r.Payload = e.Body
			} else {
				r.PayloadBase64 = append([]byte{}, e.Body...)
			}
		}
		list = append(list, r)
	}

	if o.json {
		return writeJSON(c.stdout, list)
	}
	total, err := out.CountDead(ctx, conn)
	if err != nil {
		return err
	}
	if len(list) > 0 {
		tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "SEQ\tID\tTYPE\tKEY\tATTEMPTS\tDEAD AT\tAGE\tLAST ERROR")
		for _, r := range list {
			fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%d\t%s\t%s\t%s\n", r.Seq, r.ID, cell(r.EventType, 40),
				cell(deref(r.PartitionKey, "-"), 24), r.Attempts, r.DeadAt.UTC().Format(time.RFC3339),
				formatAge(time.Duration(r.AgeSeconds*float64(time.Second))), cell(deref(r.LastError, "-"), 60))
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	fmt.Fprintf(c.stdout, "%d dead events shown (%d dead in total)\n", len(list), total)
	return nil
}

func (c *cliEnv) deadRetry(ctx context.Context, o deadRetryFlags) error {
	selectors := 0
	for _, given := range []bool{len(o.ids) > 0, len(o.types) > 0, o.all} {
		if given {
			selectors++
		}
	}
	if selectors != 1 {
		return usagef("dead retry: use exactly one of --id, --type or --all")
	}
	filter := ops.DeadFilter{IDs: o.ids, Types: o.types}
	mass := len(o.ids) == 0 // --type or --all
	if mass {
		if err := c.needConfirmation("dead retry "+selectorFlag(o.all), o.yes); err != nil {
			return err
		}
	}

	conn, out, err := c.openOutbox(ctx)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))

	if mass && !o.yes {
		ok, err := c.confirmRows(ctx, conn, out, &filter, "retry", o.json)
		if err != nil || !ok {
			return err
		}
	}
	retried, err := out.RetryDead(ctx, conn, filter)
	if err != nil {
		return err
	}
	if err := c.reportCount(o.json, "retried", len(retried), retried); err != nil {
		return err
	}
	if len(o.ids) > 0 && len(retried) < len(o.ids) {
		return c.explainMissing(ctx, conn, out, o.ids, retried)
	}
	return nil
}

// explainMissing reports why some --id were not retried, as an error so
// that the exit status shows the command did not do all it was asked.
func (c *cliEnv) explainMissing(ctx context.Context, conn *pgx.Conn, out *ops.Outbox, ids, retried []uuid.UUID) error {
	done := map[uuid.UUID]bool{}
	for _, id := range retried {
		done[id] = true
	}
	var missing []uuid.UUID
	for _, id := range ids {
		if !done[id] {
			missing = append(missing, id)
		}
	}
	state, err := out.EventStates(ctx, conn, missing)
	if err != nil {
		return fmt.Errorf("look up ids not retried: %w", err)
	}
	var lines []string
	for _, id := range missing {
		switch s := state[id]; s {
		case "":
			lines = append(lines, fmt.Sprintf("%s: not found", id))
		case ops.StateDead: // was pending at the update and failed since; rare
			lines = append(lines, fmt.Sprintf("%s: died just now; retry it again", id))
		default:
			lines = append(lines, fmt.Sprintf("%s: not dead (%s)", id, s))
		}
	}
	return fmt.Errorf("%d of %d ids not retried:\n  %s", len(missing), len(ids), strings.Join(lines, "\n  "))
}

func (c *cliEnv) deadPurge(ctx context.Context, o deadPurgeFlags) error {
	if !o.olderThan.set {
		return usagef("dead purge: --older-than is required, a positive age such as 72h or 7d")
	}
	if err := c.needConfirmation("dead purge", o.yes); err != nil {
		return err
	}
	filter := ops.DeadFilter{Types: o.types, OlderThan: o.olderThan.d}

	conn, out, err := c.openOutbox(ctx)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))

	if !o.yes {
		ok, err := c.confirmRows(ctx, conn, out, &filter, "purge", o.json)
		if err != nil || !ok {
			return err
		}
	}
	n, err := out.PurgeDead(ctx, conn, filter)
	if err != nil {
		return err
	}
	return c.reportCount(o.json, "purged", int(n), nil)
}

func selectorFlag(all bool) string {
	if all {
		return "--all"
	}
	return "--type"
}

// needConfirmation refuses a mass action up front when nobody can answer
// the prompt: without --yes, stdin must be a terminal. It runs before
// connecting, so the outcome never depends on the data.
func (c *cliEnv) needConfirmation(command string, yes bool) error {
	if yes || isTerminal(c.stdin) {
		return nil
	}
	return usagef("%s acts on many events: add --yes to confirm (stdin is not a terminal, so there is no one to ask); nothing changed", command)
}

// confirmRows counts the rows filter selects, asks whether to act on them,
// and on yes pins filter to exactly those rows. With nothing to do it
// prints the zero result and returns false without asking.
func (c *cliEnv) confirmRows(ctx context.Context, conn *pgx.Conn, out *ops.Outbox, filter *ops.DeadFilter, verb string, asJSON bool) (bool, error) {
	seqs, err := out.SelectDead(ctx, conn, *filter)
	if err != nil {
		return false, err
	}
	past := map[string]string{"retry": "retried", "purge": "purged"}[verb]
	if len(seqs) == 0 {
		return false, c.reportCount(asJSON, past, 0, nil)
	}
	if err := c.confirm(fmt.Sprintf("%s %d dead events?", verb, len(seqs)), "nothing "+past); err != nil {
		return false, err
	}
	filter.Seqs = seqs
	return true, nil
}

// isTerminal reports whether r (a stream) is a character device, that is a terminal
// someone can answer a prompt on. /dev/null is a character device too; the
// prompt then reads end of input, which counts as no.
func isTerminal(r any) bool {
	f, ok := r.(interface{ Stat() (os.FileInfo, error) })
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

// openOutbox loads the configuration (only postgres.* must be valid),
// connects and checks that the outbox table exists.
func (c *cliEnv) openOutbox(ctx context.Context) (*pgx.Conn, *ops.Outbox, error) {
	cfg, err := c.loadConfig("postgres.")
	if err != nil {
		return nil, nil, err
	}
	return connectOutbox(ctx, cfg)
}

func connectOutbox(ctx context.Context, cfg config.File) (*pgx.Conn, *ops.Outbox, error) {
	out, err := ops.New(cfg.Postgres.Schema, cfg.Postgres.Table)
	if err != nil {
		return nil, nil, err
	}
	poolCfg, err := relay.PoolConfig(cfg.Postgres)
	if err != nil {
		return nil, nil, err
	}
	conn, err := pgx.ConnectConfig(ctx, poolCfg.ConnConfig)
	if err != nil {
		return nil, nil, fmt.Errorf("connect: %s", relay.Redact(err.Error()))
	}
	exists, err := out.Exists(ctx, conn)
	if err == nil && !exists {
		err = fmt.Errorf("%w: %s (run `outbox-relay migrate up`, or check postgres.schema and postgres.table)", relay.ErrTableMissing, out.Table())
	}
	if err != nil {
		conn.Close(context.WithoutCancel(ctx))
		return nil, nil, err
	}
	return conn, out, nil
}
