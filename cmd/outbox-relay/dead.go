package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
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

const deadUsage = `Usage:
  outbox-relay dead list  [--type T]... [--older-than AGE] [--newer-than AGE] [--limit N] [--json [--payload]]
  outbox-relay dead retry (--id UUID... | --type T... | --all) [--yes]
  outbox-relay dead purge --older-than AGE [--type T]... [--yes]

A dead event is one the relay parked (dead_at set) after relay.max_attempts
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
rows: on a terminal they show the count and ask; otherwise they need --yes.
`

func (c *cliEnv) cmdDead(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return usagef("dead needs an action: list, retry or purge\n\n%s", deadUsage)
	}
	switch action, rest := args[0], args[1:]; action {
	case "list":
		return c.deadList(ctx, rest)
	case "retry":
		return c.deadRetry(ctx, rest)
	case "purge":
		return c.deadPurge(ctx, rest)
	case "help", "-h", "--help":
		fmt.Fprint(c.stdout, deadUsage)
		return nil
	default:
		return usagef("dead: unknown action %q: use list, retry or purge", action)
	}
}

// deadFlags returns the FlagSet of a dead action, whose -h prints deadUsage.
func (c *cliEnv) deadFlags(action string) (*flag.FlagSet, *string) {
	fs, path := c.flags("dead " + action)
	fs.Usage = func() {
		for _, l := range strings.Split(deadUsage, "\n") {
			if strings.HasPrefix(l, "  outbox-relay dead "+action+" ") {
				fmt.Fprintf(c.stderr, "Usage:\n%s\n\n", l)
			}
		}
		fmt.Fprintln(c.stderr, "Flags (outbox-relay dead help explains more):")
		fs.PrintDefaults()
	}
	return fs, path
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

func (c *cliEnv) deadList(ctx context.Context, args []string) error {
	fs, path := c.deadFlags("list")
	var types stringList
	fs.Var(&types, "type", "only events of this `type` (repeatable)")
	olderThan := ageFlag{}
	newerThan := ageFlag{}
	fs.Var(&olderThan, "older-than", "only events that died longer ago than this `age` (e.g. 72h, 7d)")
	fs.Var(&newerThan, "newer-than", "only events that died at most this `age` ago (e.g. 30m, 1d)")
	limit := fs.Int("limit", 50, "show at most this many events")
	asJSON := fs.Bool("json", false, "print one JSON array with every field instead of a table")
	withPayload := fs.Bool("payload", false, "with --json, include the payload: as JSON when it is valid UTF-8 JSON\n(field payload, re-encoded compactly), else base64 of the exact bytes (field payload_base64)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usagef("dead list: unexpected argument %q", fs.Arg(0))
	}
	if *limit < 1 {
		return usagef("dead list --limit: must be at least 1, got %d", *limit)
	}
	if *withPayload && !*asJSON {
		return usagef("dead list --payload: only with --json")
	}
	if olderThan.set && newerThan.set && newerThan.d <= olderThan.d {
		return usagef("dead list: --newer-than (%s) must be longer than --older-than (%s), or nothing matches", newerThan.d, olderThan.d)
	}
	filter := deadFilter{types: types, olderThan: olderThan.d, newerThan: newerThan.d}

	conn, q, _, err := c.openOutbox(ctx, *path)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))

	rows, err := conn.Query(ctx, q.deadList, append(filter.args(), *withPayload, *limit)...)
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
		if *withPayload {
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

	if *asJSON {
		enc := json.NewEncoder(c.stdout)
		enc.SetIndent("", "  ")
		enc.SetEscapeHTML(false)
		return enc.Encode(list)
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

func (c *cliEnv) deadRetry(ctx context.Context, args []string) error {
	fs, path := c.deadFlags("retry")
	var ids idList
	var types stringList
	fs.Var(&ids, "id", "retry the dead event with this `uuid` (repeatable); never asks")
	fs.Var(&types, "type", "retry every dead event of this `type` (repeatable)")
	all := fs.Bool("all", false, "retry every dead event")
	yes := fs.Bool("yes", false, "do not ask before retrying by --type or --all")
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usagef("dead retry: unexpected argument %q", fs.Arg(0))
	}
	selectors := 0
	for _, given := range []bool{len(ids) > 0, len(types) > 0, *all} {
		if given {
			selectors++
		}
	}
	if selectors != 1 {
		return usagef("dead retry: use exactly one of --id, --type or --all")
	}
	filter := deadFilter{ids: ids, types: types}
	mass := len(ids) == 0 // --type or --all
	if mass {
		if err := c.needConfirmation("dead retry "+selectorFlag(*all), *yes); err != nil {
			return err
		}
	}

	conn, q, t, err := c.openOutbox(ctx, *path)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))

	if mass && !*yes {
		ok, err := c.confirmRows(ctx, conn, q, &filter, "retry")
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
	fmt.Fprintf(c.stdout, "retried %d dead events\n", len(retried))
	if len(ids) > 0 && len(retried) < len(ids) {
		return c.explainMissing(ctx, conn, q, ids, retried)
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

func (c *cliEnv) deadPurge(ctx context.Context, args []string) error {
	fs, path := c.deadFlags("purge")
	var types stringList
	olderThan := ageFlag{}
	fs.Var(&olderThan, "older-than", "required: delete dead events that died longer ago than this `age` (e.g. 72h, 7d)")
	fs.Var(&types, "type", "only events of this `type` (repeatable)")
	yes := fs.Bool("yes", false, "do not ask before deleting")
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usagef("dead purge: unexpected argument %q", fs.Arg(0))
	}
	if !olderThan.set {
		return usagef("dead purge: --older-than is required, a positive age such as 72h or 7d")
	}
	if err := c.needConfirmation("dead purge", *yes); err != nil {
		return err
	}
	filter := deadFilter{types: types, olderThan: olderThan.d}

	conn, q, t, err := c.openOutbox(ctx, *path)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))

	if !*yes {
		ok, err := c.confirmRows(ctx, conn, q, &filter, "purge")
		if err != nil || !ok {
			return err
		}
	}
	tag, err := conn.Exec(ctx, q.deadPurge, filter.args()...)
	if err != nil {
		return fmt.Errorf("purge dead events in %s: %w", t, err)
	}
	fmt.Fprintf(c.stdout, "purged %d dead events\n", tag.RowsAffected())
	return nil
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
func (c *cliEnv) confirmRows(ctx context.Context, conn *pgx.Conn, q opsQueries, filter *deadFilter, verb string) (bool, error) {
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
		fmt.Fprintf(c.stdout, "%s 0 dead events\n", past)
		return false, nil
	}
	// The prompt goes to stderr, like rm -i's, so that stdout holds only
	// the result.
	fmt.Fprintf(c.stderr, "%s %d dead events? [y/N] ", verb, len(seqs))
	answer, err := bufio.NewReader(c.stdin).ReadString('\n')
	if err != nil && !errors.Is(err, io.EOF) {
		return false, fmt.Errorf("read answer: %w", err)
	}
	switch strings.ToLower(strings.TrimSpace(answer)) {
	case "y", "yes":
		filter.seqs = seqs
		return true, nil
	}
	if errors.Is(err, io.EOF) {
		fmt.Fprintln(c.stderr)
	}
	return false, fmt.Errorf("not confirmed: nothing %s", past)
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
func (c *cliEnv) openOutbox(ctx context.Context, path string) (*pgx.Conn, opsQueries, ident.Table, error) {
	cfg, err := c.loadConfig(path, "postgres.")
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
