package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/internal/config"
	"github.com/outbox-relay/outbox-relay/internal/ident"
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

// deadFilter selects dead rows; its zero value selects them all. Each
// field maps onto a parameter of deadMatch (opsql.go); nil or zero there
// means no bound.
type deadFilter struct {
	ids       []uuid.UUID
	types     []string
	olderThan time.Duration
	newerThan time.Duration
	seqs      []int64 // exactly the rows an operator confirmed
}

func (f deadFilter) args() []any {
	a := []any{nil, nil, nil, nil, nil}
	if f.ids != nil {
		a[0] = f.ids
	}
	if f.types != nil {
		a[1] = f.types
	}
	if f.olderThan > 0 {
		a[2] = f.olderThan
	}
	if f.newerThan > 0 {
		a[3] = f.newerThan
	}
	if f.seqs != nil {
		a[4] = f.seqs
	}
	return a
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
	filter := deadFilter{types: o.types, olderThan: o.olderThan.d, newerThan: o.newerThan.d}

	conn, q, _, err := c.openOutbox(ctx)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))

	rows, err := conn.Query(ctx, q.deadList, append(filter.args(), o.payload, o.limit)...)
	if err != nil {
		return fmt.Errorf("list dead events: %w", err)
	}
	list := []deadRow{}
	for rows.Next() {
		var r deadRow
		var payload []byte
		if err := rows.Scan(&r.Seq, &r.ID, &r.EventType, &r.PartitionKey, &r.ContentType, &r.Headers,
			&r.CorrelationID, &r.CreatedAt, &r.AvailableAt, &r.Attempts, &r.LastError, &r.DeadAt,
			&r.AgeSeconds, &payload); err != nil {
			rows.Close()
			return fmt.Errorf("list dead events: %w", err)
		}
		if o.payload {
			if utf8.Valid(payload) && json.Valid(payload) {
				r.Payload = payload
			} else {
				r.PayloadBase64 = append([]byte{}, payload...)
			}
		}
		list = append(list, r)
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("list dead events: %w", err)
	}

	if o.json {
		return writeJSON(c.stdout, list)
	}
	var total int64
	if err := conn.QueryRow(ctx, q.deadTotal).Scan(&total); err != nil {
		return fmt.Errorf("count dead events: %w", err)
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
	filter := deadFilter{ids: o.ids, types: o.types}
	mass := len(o.ids) == 0 // --type or --all
	if mass {
		if err := c.needConfirmation("dead retry "+selectorFlag(o.all), o.yes); err != nil {
			return err
		}
	}

	conn, q, t, err := c.openOutbox(ctx)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))

	if mass && !o.yes {
		ok, err := c.confirmRows(ctx, conn, q, &filter, "retry", o.json)
		if err != nil || !ok {
			return err
		}
	}
	var retried []uuid.UUID
	err = pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		rows, err := tx.Query(ctx, q.deadRetry, filter.args()...)
		if err != nil {
			return err
		}
		retried, err = pgx.CollectRows(rows, pgx.RowTo[uuid.UUID])
		if err != nil || len(retried) == 0 {
			return err
		}
		_, err = tx.Exec(ctx, q.wakeRelay, t.Channel())
		return err
	})
	if err != nil {
		return fmt.Errorf("retry dead events in %s: %w", t, err)
	}
	if err := c.reportCount(o.json, "retried", len(retried), retried); err != nil {
		return err
	}
	if len(o.ids) > 0 && len(retried) < len(o.ids) {
		return c.explainMissing(ctx, conn, q, o.ids, retried)
	}
	return nil
}

// explainMissing reports why some --id were not retried, as an error so
// that the exit status shows the command did not do all it was asked.
func (c *cliEnv) explainMissing(ctx context.Context, conn *pgx.Conn, q opsQueries, ids, retried []uuid.UUID) error {
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
	state := map[uuid.UUID]string{}
	rows, err := conn.Query(ctx, q.idStates, missing)
	if err != nil {
		return fmt.Errorf("look up ids not retried: %w", err)
	}
	var id uuid.UUID
	var s string
	if _, err := pgx.ForEachRow(rows, []any{&id, &s}, func() error { state[id] = s; return nil }); err != nil {
		return fmt.Errorf("look up ids not retried: %w", err)
	}
	var lines []string
	for _, id := range missing {
		switch s := state[id]; s {
		case "":
			lines = append(lines, fmt.Sprintf("%s: not found", id))
		case "dead": // was pending at the update and failed since; rare
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
	filter := deadFilter{types: o.types, olderThan: o.olderThan.d}

	conn, q, t, err := c.openOutbox(ctx)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))

	if !o.yes {
		ok, err := c.confirmRows(ctx, conn, q, &filter, "purge", o.json)
		if err != nil || !ok {
			return err
		}
	}
	tag, err := conn.Exec(ctx, q.deadPurge, filter.args()...)
	if err != nil {
		return fmt.Errorf("purge dead events in %s: %w", t, err)
	}
	return c.reportCount(o.json, "purged", int(tag.RowsAffected()), nil)
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
func (c *cliEnv) confirmRows(ctx context.Context, conn *pgx.Conn, q opsQueries, filter *deadFilter, verb string, asJSON bool) (bool, error) {
	rows, err := conn.Query(ctx, q.deadSelect, filter.args()...)
	if err != nil {
		return false, fmt.Errorf("select dead events: %w", err)
	}
	seqs, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		return false, fmt.Errorf("select dead events: %w", err)
	}
	past := map[string]string{"retry": "retried", "purge": "purged"}[verb]
	if len(seqs) == 0 {
		return false, c.reportCount(asJSON, past, 0, nil)
	}
	if err := c.confirm(fmt.Sprintf("%s %d dead events?", verb, len(seqs)), "nothing "+past); err != nil {
		return false, err
	}
	filter.seqs = seqs
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
func (c *cliEnv) openOutbox(ctx context.Context) (*pgx.Conn, opsQueries, ident.Table, error) {
	cfg, err := c.loadConfig("postgres.")
	if err != nil {
		return nil, opsQueries{}, ident.Table{}, err
	}
	return connectOutbox(ctx, cfg)
}

func connectOutbox(ctx context.Context, cfg config.File) (*pgx.Conn, opsQueries, ident.Table, error) {
	t := ident.Table{Schema: cfg.Postgres.Schema, Name: cfg.Postgres.Table}
	q := newOpsQueries(t)
	poolCfg, err := relay.PoolConfig(cfg.Postgres)
	if err != nil {
		return nil, q, t, err
	}
	conn, err := pgx.ConnectConfig(ctx, poolCfg.ConnConfig)
	if err != nil {
		return nil, q, t, fmt.Errorf("connect: %s", relay.Redact(err.Error()))
	}
	var exists bool
	if err := conn.QueryRow(ctx, q.tableExists, t.Quoted()).Scan(&exists); err != nil {
		conn.Close(context.WithoutCancel(ctx))
		return nil, q, t, fmt.Errorf("check outbox table: %w", err)
	}
	if !exists {
		conn.Close(context.WithoutCancel(ctx))
		return nil, q, t, fmt.Errorf("%w: %s (run `outbox-relay migrate up`, or check postgres.schema and postgres.table)", relay.ErrTableMissing, t)
	}
	return conn, q, t, nil
}

// stringList is a repeatable string flag.
type stringList []string

func (l *stringList) String() string { return strings.Join(*l, ",") }

func (l *stringList) Type() string { return "string" }

func (l *stringList) Set(v string) error {
	if v == "" {
		return errors.New("must not be empty")
	}
	*l = append(*l, v)
	return nil
}

// idList is a repeatable UUID flag.
type idList []uuid.UUID

func (l *idList) String() string { return fmt.Sprint([]uuid.UUID(*l)) }

func (l *idList) Type() string { return "uuid" }

func (l *idList) Set(v string) error {
	id, err := uuid.Parse(v)
	if err != nil {
		return fmt.Errorf("%q is not a UUID", v)
	}
	*l = append(*l, id)
	return nil
}

// ageFlag is a positive age: a Go duration or days (7d, 1d12h).
type ageFlag struct {
	d   time.Duration
	set bool
}

func (a *ageFlag) Type() string { return "age" }

func (a *ageFlag) String() string {
	if !a.set {
		return ""
	}
	return a.d.String()
}

func (a *ageFlag) Set(v string) error {
	d, err := parseAge(v)
	if err != nil {
		return err
	}
	a.d, a.set = d, true
	return nil
}

var daysPrefix = regexp.MustCompile(`^(\d+)d(.*)$`)

// parseAge parses a positive duration, accepting a leading number of days
// ("7d", "1d12h") besides everything time.ParseDuration takes.
func parseAge(s string) (time.Duration, error) {
	bad := fmt.Errorf("%q is not a positive duration such as 30m, 72h or 7d", s)
	var days time.Duration
	rest := s
	if m := daysPrefix.FindStringSubmatch(s); m != nil {
		n, err := strconv.Atoi(m[1])
		if err != nil || n > 100000 {
			return 0, bad
		}
		days, rest = time.Duration(n)*24*time.Hour, m[2]
	}
	var d time.Duration
	if rest != "" {
		var err error
		if d, err = time.ParseDuration(rest); err != nil {
			return 0, bad
		}
	}
	if days+d <= 0 || (rest == "" && days == 0) {
		return 0, bad
	}
	return days + d, nil
}

// formatAge renders an age compactly and to the second: 45s, 3m12s,
// 5h3m, 2d4h.
func formatAge(d time.Duration) string {
	d = d.Round(time.Second)
	switch {
	case d < 0:
		return "0s"
	case d < time.Minute:
		return d.String()
	case d < time.Hour:
		return fmt.Sprintf("%dm%02ds", d/time.Minute, d%time.Minute/time.Second)
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh%02dm", d/time.Hour, d%time.Hour/time.Minute)
	default:
		return fmt.Sprintf("%dd%02dh", d/(24*time.Hour), d%(24*time.Hour)/time.Hour)
	}
}

// cell makes s safe for one tabwriter cell: control characters (tabs,
// newlines) become spaces and it is cut to max runes.
func cell(s string, max int) string {
	s = strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return ' '
		}
		return r
	}, s)
	if utf8.RuneCountInString(s) <= max {
		return s
	}
	return string([]rune(s)[:max-1]) + "…"
}

func deref(s *string, none string) string {
	if s == nil {
		return none
	}
	return *s
}
