package main

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/spf13/cobra"
	"gopkg.in/yaml.v3"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

// commandPaths lists every command and action, e.g. ["dead", "retry"].
func commandPaths() [][]string {
	var out [][]string
	var walk func(cmd *cobra.Command, path []string)
	walk = func(cmd *cobra.Command, path []string) {
		for _, sub := range cmd.Commands() {
			if sub.Hidden || sub.Name() == "help" {
				continue
			}
			p := append(slices.Clone(path), sub.Name())
			out = append(out, p)
			walk(sub, p)
		}
	}
	walk((&cliEnv{}).rootCommand(), nil)
	return out
}

// TestEveryCommandHelpExits0 checks that -h, --help and `help <command>`
// print each command's own usage on stdout and exit 0, wherever -h stands.
func TestEveryCommandHelpExits0(t *testing.T) {
	t.Parallel()
	paths := commandPaths()
	if len(paths) < 15 {
		t.Fatalf("only %d commands found: %q", len(paths), paths)
	}
	for _, p := range paths {
		usage := "outbox-relay " + strings.Join(p, " ")
		for _, args := range [][]string{
			append(slices.Clone(p), "--help"),
			append(slices.Clone(p), "-h"),
			append([]string{"help"}, p...),
			append([]string{"--config", "/nonexistent.yaml"}, append(slices.Clone(p), "-h")...),
		} {
			code, out, errOut := runCLI(t, nil, args...)
			if code != exitOK || !strings.Contains(out, "Usage:") || !strings.Contains(out, usage) {
				t.Errorf("%q: exit %d, want 0 with the usage of %q on stdout\nstdout: %s\nstderr: %s", args, code, usage, out, errOut)
			}
		}
	}
}

// TestFlagsAnywhere checks that the global --config and an action's flags
// may stand before or after the command words.
func TestFlagsAnywhere(t *testing.T) {
	t.Parallel()
	cfg := writeFile(t, validYAML)
	var outs []string
	for _, args := range [][]string{
		{"--config", cfg, "config", "check", "--json"},
		{"config", "--config", cfg, "check", "--json"},
		{"config", "check", "--json", "--config=" + cfg},
		{"config", "check", "--config", cfg, "--json"},
	} {
		code, out, errOut := runCLI(t, nil, args...)
		if code != exitOK {
			t.Fatalf("%q: exit %d: %s", args, code, errOut)
		}
		outs = append(outs, out)
	}
	for i, out := range outs[1:] {
		if out != outs[0] {
			t.Errorf("flag order %d changed the output:\n%s\nvs\n%s", i+1, out, outs[0])
		}
	}
}

// TestCompletion checks that shell completion scripts are generated and
// that actions complete.
func TestCompletion(t *testing.T) {
	t.Parallel()
	for _, shell := range []string{"bash", "zsh", "fish", "powershell"} {
		code, out, errOut := runCLI(t, nil, "completion", shell)
		if code != exitOK || !strings.Contains(out, "outbox-relay") {
			t.Errorf("completion %s: exit %d, %d bytes; stderr %s", shell, code, len(out), errOut)
		}
	}
	code, out, _ := runCLI(t, nil, cobra.ShellCompRequestCmd, "migrate", "")
	for _, action := range []string{"up", "down", "status", "sql"} {
		if code != exitOK || !strings.Contains(out, action+"\t") {
			t.Errorf("completing `migrate `: exit %d, no %q in\n%s", code, action, out)
		}
	}
}

// TestConfigCheck checks that config check names every bad key and exits
// 2, and with a good configuration prints the effective one, defaults
// filled and passwords redacted, and exits 0.
func TestConfigCheck(t *testing.T) {
	t.Parallel()
	// An unknown key does not hide the bad values beside it.
	bad := writeFile(t, validYAML+"relay:\n  batch_size: -5\n  ordering: sideways\n  batchsize: 3\nwake:\n  mode: listen\n")
	code, out, errOut := runCLI(t, []string{"OUTBOX_RELAY_LOG_LEVEL=loud"}, "config", "check", "--config", bad)
	if code != exitUsage || out != "" {
		t.Fatalf("bad config: exit %d, stdout %q; want 2 and nothing on stdout", code, out)
	}
	for _, key := range []string{"relay.batch_size", "relay.ordering", "relay.batchsize: unknown key", "wake.mode", "log.level"} {
		if !strings.Contains(errOut, key) {
			t.Errorf("bad config: stderr does not name %s:\n%s", key, errOut)
		}
	}

	good := writeFile(t, validYAML)
	env := []string{"OUTBOX_RELAY_POSTGRES_DSN=host=db user=relay password=hunter2", "OUTBOX_RELAY_RELAY_BATCH_SIZE=42"}
	code, out, errOut = runCLI(t, env, "config", "check", "--config", good)
	if code != exitOK {
		t.Fatalf("good config: exit %d: %s", code, errOut)
	}
	if strings.Contains(out, "secret") || strings.Contains(out, "hunter2") {
		t.Errorf("a password is printed:\n%s", out)
	}
	var eff struct {
		Postgres struct{ DSN string }
		AMQP     struct {
			URL      string
			Exchange string
		} `yaml:"amqp"`
		Relay struct {
			BatchSize  int    `yaml:"batch_size"`
			OnDispatch string `yaml:"on_dispatch"`
		}
	}
	if err := yaml.Unmarshal([]byte(out), &eff); err != nil {
		t.Fatalf("output is not YAML: %v\n%s", err, out)
	}
	if eff.Postgres.DSN != "host=db user=relay password=xxxxx" || eff.AMQP.URL != "amqp://guest:xxxxx@127.0.0.1:5672/" ||
		eff.AMQP.Exchange != "events" || eff.Relay.BatchSize != 42 || eff.Relay.OnDispatch != "mark" {
		t.Errorf("effective config wrong: %+v\n%s", eff, out)
	}

	code, out, _ = runCLI(t, env, "config", "check", "--config", good, "--json")
	var asJSON map[string]map[string]any
	if err := json.Unmarshal([]byte(out), &asJSON); code != exitOK || err != nil || asJSON["relay"]["batch_size"] != 42.0 {
		t.Errorf("--json: exit %d, err %v, output\n%s", code, err, out)
	}
}

// TestBlankDSNExits2 checks that a blank OUTBOX_RELAY_POSTGRES_DSN, as a
// templated manifest leaves, stops run with status 2 naming postgres.dsn
// instead of connecting to pgx's defaults.
func TestBlankDSNExits2(t *testing.T) {
	t.Parallel()
	code, _, errOut := runCLI(t, []string{"OUTBOX_RELAY_POSTGRES_DSN= ", "OUTBOX_RELAY_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/",
		"OUTBOX_RELAY_AMQP_EXCHANGE=e", "OUTBOX_RELAY_METRICS_ADDR=off"}, "run")
	if code != exitUsage || !strings.Contains(errOut, "postgres.dsn") {
		t.Fatalf("exit %d, want 2 naming postgres.dsn; stderr:\n%s", code, errOut)
	}
}

// TestMigrateSQLBuildsTheSameTable checks that the SQL migrate sql prints,
// run by hand, builds the table migrate up builds (columns, indexes,
// functions), for the configured schema and table.
func TestMigrateSQLBuildsTheSameTable(t *testing.T) {
	t.Parallel()
	o := testenv.NewOutbox(t) // <schema>.outbox, by migrate up
	code, sql, errOut := runCLI(t, []string{"OUTBOX_RELAY_POSTGRES_SCHEMA=" + o.Schema, "OUTBOX_RELAY_POSTGRES_TABLE=by_hand"}, "migrate", "sql")
	if code != exitOK {
		t.Fatalf("migrate sql: exit %d: %s", code, errOut)
	}
	ctx := context.Background()
	conn, err := o.Pool.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Release()
	if _, err := conn.Conn().PgConn().Exec(ctx, sql).ReadAll(); err != nil {
		t.Fatalf("the printed SQL fails: %v\n%s", err, sql)
	}
	describe := func(table string) string {
		var d string
		err := o.Pool.QueryRow(ctx, `
SELECT (SELECT string_agg(column_name || ' ' || data_type || ' ' || is_nullable, ', ' ORDER BY ordinal_position)
          FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2)
    || ' | ' || (SELECT string_agg(replace(indexdef, $2, 'T'), ', ' ORDER BY indexdef)
          FROM pg_indexes WHERE schemaname = $1 AND tablename = $2)
    || ' | ' || (SELECT count(*) FROM pg_proc WHERE pronamespace = $1::regnamespace AND proname LIKE $2 || '%')`,
			o.Schema, table).Scan(&d)
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	if byHand, byGoose := describe("by_hand"), describe("outbox"); byHand != byGoose {
		t.Errorf("migrate sql builds\n  %s\nmigrate up builds\n  %s", byHand, byGoose)
	}
	if _, err := o.Pool.Exec(ctx, fmt.Sprintf(`INSERT INTO %q.by_hand (event_type, payload) VALUES ('t', '{}')`, o.Schema)); err != nil {
		t.Errorf("insert into the hand-made table: %v", err)
	}
}

// TestDestructiveCommandsAsk checks that migrate down and replay --all,
// with no terminal to ask on and no --yes, exit 2 and change nothing; that
// on a terminal a "no" changes nothing; and that --yes acts.
func TestDestructiveCommandsAsk(t *testing.T) {
	t.Parallel()
	o := testenv.NewOutbox(t)
	insertRows(t, o, opsRow{typ: "a", dispatchedAgo: 1e9})
	env := opsEnv(o, "OUTBOX_RELAY_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/", "OUTBOX_RELAY_AMQP_EXCHANGE=none")
	tableExists := func() bool {
		var ok bool
		if err := o.Pool.QueryRow(context.Background(), "SELECT to_regclass($1) IS NOT NULL", o.Table.Quoted()).Scan(&ok); err != nil {
			t.Fatal(err)
		}
		return ok
	}
	for _, args := range [][]string{{"migrate", "down", "--to", "0"}, {"migrate", "down"}, {"replay", "--all"}} {
		code, out, errOut := runCLI(t, env, args...)
		if code != exitUsage || !strings.Contains(errOut, "--yes") {
			t.Errorf("%q without a terminal: exit %d, want 2 asking for --yes; stdout %q stderr %q", args, code, out, errOut)
		}
		code, _, errOut = runWithStdin(t, env, tty{strings.NewReader("n\n")}, args...)
		if code != exitFailed || !strings.Contains(errOut, "[y/N]") || !strings.Contains(errOut, "not confirmed") {
			t.Errorf("%q answered no: exit %d, want 1 after the question; stderr %q", args, code, errOut)
		}
	}
	if !tableExists() {
		t.Fatal("the table was dropped without confirmation")
	}
	if code, _, errOut := runCLI(t, env, "migrate", "down", "--to", "0", "--yes", "--json"); code != exitOK || tableExists() {
		t.Fatalf("migrate down --to 0 --yes: exit %d, table still there: %v; %s", code, tableExists(), errOut)
	}
}

// TestJSONOutputs checks that the commands that report state or a result
// print valid JSON with --json.
func TestJSONOutputs(t *testing.T) {
	t.Parallel()
	o := testenv.NewOutbox(t)
	env := opsEnv(o)
	for _, args := range [][]string{
		{"version", "--json"},
		{"migrate", "status", "--json"},
		{"migrate", "up", "--json"},
		{"notify", "status", "--json"},
		{"status", "--json"},
		{"dead", "list", "--json"},
		{"dead", "retry", "--all", "--yes", "--json"},
		{"dead", "purge", "--older-than", "1h", "--yes", "--json"},
		{"replay", "--all", "--dry-run", "--json"},
	} {
		code, out, errOut := runCLI(t, env, args...)
		if code != exitOK || !json.Valid([]byte(out)) {
			t.Errorf("%q: exit %d, output not JSON:\n%s\n%s", args, code, out, errOut)
		}
	}
}
