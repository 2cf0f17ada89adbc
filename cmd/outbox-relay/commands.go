package main

import (
	"context"
	"fmt"
	"runtime/debug"
	"strings"

	"github.com/spf13/cobra"
)

const rootLong = `outbox-relay publishes a transactional outbox table to RabbitMQ.

Every command reads the configuration from --config FILE (or the file
OUTBOX_RELAY_CONFIG names), and every key can also be set by environment,
e.g. OUTBOX_RELAY_POSTGRES_DSN for postgres.dsn (see config.example.yaml).
Exit status: 0 done, 1 failed, 2 bad command line or configuration.`

// rootCommand builds the command tree. cobra gives every command and action
// -h/--help, `help <command>`, flags anywhere on the line and shell
// completion (outbox-relay completion bash|zsh|fish|powershell).
func (c *cliEnv) rootCommand() *cobra.Command {
	cobra.EnableCommandSorting = false // the order below, most used first
	root := &cobra.Command{
		Use:           "outbox-relay",
		Short:         "publish a transactional outbox table to RabbitMQ",
		Long:          rootLong,
		Version:       version,
		SilenceErrors: true, // exitCode prints them
		SilenceUsage:  true,
		Args:          cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cmd.SetOut(c.stderr)
			_ = cmd.Help()
			return usagef("a command is needed")
		},
	}
	root.SetIn(c.stdin)
	root.SetOut(c.stdout)
	root.SetErr(c.stderr)
	root.SetVersionTemplate(versionText())
	root.SetFlagErrorFunc(func(cmd *cobra.Command, err error) error {
		return usagef("%s: %v (see %s --help)", cmd.CommandPath(), err, cmd.CommandPath())
	})
	root.PersistentFlags().StringVar(&c.configPath, "config", "",
		"configuration file (YAML; default $OUTBOX_RELAY_CONFIG); keys can be overridden by OUTBOX_RELAY_* variables")
	_ = root.MarkPersistentFlagFilename("config", "yaml", "yml")

	root.AddCommand(
		c.runCommand(),
		c.migrateCommand(),
		c.notifyCommand(),
		c.statusCommand(),
		c.deadCommand(),
		c.replayCommand(),
		c.configCommand(),
		c.versionCommand(),
	)
	return root
}

// action wraps a command's work: from here on errors are the command's own,
// not the command line's (see run).
func (c *cliEnv) action(fn func(ctx context.Context, cmd *cobra.Command) error) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, _ []string) error {
		c.entered = true
		return fn(cmd.Context(), cmd)
	}
}

// group makes cmd a command of actions: without one, or with an unknown
// one, it is a usage error; "help" shows its help like --help does.
func group(cmd *cobra.Command, subs ...*cobra.Command) *cobra.Command {
	var names []string
	for _, s := range subs {
		cmd.AddCommand(s)
		names = append(names, s.Name())
	}
	list := names[len(names)-1]
	if len(names) > 1 {
		list = strings.Join(names[:len(names)-1], ", ") + " or " + list
	}
	cmd.Args = cobra.ArbitraryArgs
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		switch {
		case len(args) > 0 && args[0] == "help":
			return cmd.Help()
		case len(args) == 0:
			return usagef("%s needs an action: %s (see %s --help)", cmd.CommandPath(), list, cmd.CommandPath())
		default:
			return usagef("%s: unknown action %q: use %s", cmd.CommandPath(), args[0], list)
		}
	}
	return cmd
}

func (c *cliEnv) runCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "run",
		Short: "relay events until SIGTERM/SIGINT (drains, exits 0)",
		Long: `Relays events until SIGTERM or SIGINT: claims due rows, publishes them with
publisher confirms and marks them dispatched. On the signal it stops claiming,
waits up to relay.shutdown_timeout for the confirms in flight, commits what
was confirmed and exits 0; a second signal exits at once (losing nothing).`,
		Args: cobra.NoArgs,
		RunE: c.action(func(ctx context.Context, _ *cobra.Command) error { return c.cmdRun(ctx) }),
	}
}

func (c *cliEnv) migrateCommand() *cobra.Command {
	var up, status migrateOptions
	upCmd := &cobra.Command{
		Use:   "up",
		Short: "apply the pending migrations (creates the table)",
		Args:  cobra.NoArgs,
		RunE:  c.action(func(ctx context.Context, _ *cobra.Command) error { return c.migrateUp(ctx, up) }),
	}
	upCmd.Flags().BoolVar(&up.json, "json", false, "print the result as one JSON object")

	var down migrateOptions
	downCmd := &cobra.Command{
		Use:   "down [--to VERSION] [--yes]",
		Short: "roll back the last migration, or down to --to (0 removes the table and its events)",
		Long: `Rolls back the most recent migration, or every migration above --to VERSION
(--to 0 drops the outbox table and every event in it). It asks first on a
terminal; otherwise it needs --yes.`,
		Args: cobra.NoArgs,
		RunE: c.action(func(ctx context.Context, cmd *cobra.Command) error {
			down.toSet = cmd.Flags().Changed("to")
			return c.migrateDown(ctx, down)
		}),
	}
	downCmd.Flags().Int64Var(&down.to, "to", 0, "roll back to this version (0 removes the outbox table)")
	downCmd.Flags().BoolVar(&down.yes, "yes", false, "do not ask before rolling back")
	downCmd.Flags().BoolVar(&down.json, "json", false, "print the result as one JSON object")

	statusCmd := &cobra.Command{
		Use:   "status",
		Short: "list the migrations and whether each is applied",
		Args:  cobra.NoArgs,
		RunE:  c.action(func(ctx context.Context, _ *cobra.Command) error { return c.migrateStatus(ctx, status) }),
	}
	statusCmd.Flags().BoolVar(&status.json, "json", false, "print one JSON array")

	sqlCmd := &cobra.Command{
		Use:   "sql",
		Short: "print the up migrations as SQL for the configured schema and table",
		Long: `Prints the up migrations rendered for postgres.schema and postgres.table, in
order, for teams whose schema changes go through Flyway, Atlas or Liquibase.
It needs no database. Applied this way, the migrations are not recorded in
the table's goose version table, so do not mix it with migrate up.`,
		Args: cobra.NoArgs,
		RunE: c.action(func(context.Context, *cobra.Command) error { return c.migrateSQL() }),
	}
	return group(&cobra.Command{
		Use:   "migrate",
		Short: "apply, roll back, show or print schema migrations",
	}, upCmd, downCmd, statusCmd, sqlCmd)
}

func (c *cliEnv) notifyCommand() *cobra.Command {
	var json bool
	sub := func(action, short string) *cobra.Command {
		cmd := &cobra.Command{
			Use:   action,
			Short: short,
			Args:  cobra.NoArgs,
			RunE:  c.action(func(ctx context.Context, _ *cobra.Command) error { return c.cmdNotify(ctx, action, json) }),
		}
		cmd.Flags().BoolVar(&json, "json", false, "print the trigger's state as one JSON object")
		return cmd
	}
	return group(&cobra.Command{
		Use:   "notify",
		Short: "switch the table's NOTIFY trigger (for wake.mode: notify)",
		Long: `Switches the table's statement-level NOTIFY trigger, which wake.mode: notify
listens for. It is off by default because each notifying commit takes a
database-wide lock that slows producers committing at the same time.`,
	}, sub("enable", "switch the trigger on"), sub("disable", "switch the trigger off"), sub("status", "show whether the trigger is on"))
}

func (c *cliEnv) statusCommand() *cobra.Command {
	var o statusFlags
	cmd := &cobra.Command{
		Use:   "status [--json]",
		Short: "backlog, oldest age, dead, recent dispatches, per-type counts, partition owners",
		Long:  statusLong,
		Args:  cobra.NoArgs,
		RunE:  c.action(func(ctx context.Context, _ *cobra.Command) error { return c.cmdStatus(ctx, o) }),
	}
	cmd.Flags().BoolVar(&o.json, "json", false, "print one JSON object")
	// Accepted, hidden and ignored, so that existing scripts keep working:
	// the archive's BRIN index made the window it set unnecessary. (A
	// deprecation notice would land in the --json output.)
	cmd.Flags().Int64("recent-rows", 0, "ignored: dispatched counts are exact")
	_ = cmd.Flags().MarkHidden("recent-rows")
	return cmd
}

func (c *cliEnv) deadCommand() *cobra.Command {
	var l deadListFlags
	list := &cobra.Command{
		Use:   "list [--type T]... [--older-than AGE] [--newer-than AGE] [--limit N] [--json [--payload]]",
		Short: "show dead events, newest first",
		Args:  cobra.NoArgs,
		RunE:  c.action(func(ctx context.Context, _ *cobra.Command) error { return c.deadList(ctx, l) }),
	}
	f := list.Flags()
	f.Var(&l.types, "type", "only events of this `type` (repeatable)")
	f.Var(&l.olderThan, "older-than", "only events that died longer ago than this `age` (e.g. 72h, 7d)")
	f.Var(&l.newerThan, "newer-than", "only events that died at most this `age` ago (e.g. 30m, 1d)")
	f.IntVar(&l.limit, "limit", 50, "show at most this many events")
	f.BoolVar(&l.json, "json", false, "print one JSON array with every field instead of a table")
	f.BoolVar(&l.payload, "payload", false, "with --json, include the payload: as JSON when it is valid UTF-8 JSON\n(field payload, re-encoded compactly), else base64 of the exact bytes (field payload_base64)")

	var r deadRetryFlags
	retry := &cobra.Command{
		Use:   "retry (--id UUID... | --type T... | --all) [--yes] [--json]",
		Short: "make dead events due again",
		Args:  cobra.NoArgs,
		RunE:  c.action(func(ctx context.Context, _ *cobra.Command) error { return c.deadRetry(ctx, r) }),
	}
	f = retry.Flags()
	f.Var(&r.ids, "id", "retry the dead event with this `uuid` (repeatable); never asks")
	f.Var(&r.types, "type", "retry every dead event of this `type` (repeatable)")
	f.BoolVar(&r.all, "all", false, "retry every dead event")
	f.BoolVar(&r.yes, "yes", false, "do not ask before retrying by --type or --all")
	f.BoolVar(&r.json, "json", false, "print the result as one JSON object")

	var p deadPurgeFlags
	purge := &cobra.Command{
		Use:   "purge --older-than AGE [--type T]... [--yes] [--json]",
		Short: "delete dead events that died longer ago than --older-than",
		Args:  cobra.NoArgs,
		RunE:  c.action(func(ctx context.Context, _ *cobra.Command) error { return c.deadPurge(ctx, p) }),
	}
	f = purge.Flags()
	f.Var(&p.olderThan, "older-than", "required: delete dead events that died longer ago than this `age` (e.g. 72h, 7d)")
	f.Var(&p.types, "type", "only events of this `type` (repeatable)")
	f.BoolVar(&p.yes, "yes", false, "do not ask before deleting")
	f.BoolVar(&p.json, "json", false, "print the result as one JSON object")

	return group(&cobra.Command{
		Use:   "dead",
		Short: "inspect, retry or delete dead events",
		Long:  deadLong,
	}, list, retry, purge)
}

func (c *cliEnv) replayCommand() *cobra.Command {
	var o replayFlags
	cmd := &cobra.Command{
		Use:   "replay [selection] [--exchange X] [--rate N] [--batch-size N] [--dry-run] [--yes] [--json]",
		Short: "publish dispatched events again (by seq, time, type)",
		Long:  replayLong,
		Args:  cobra.NoArgs,
		RunE:  c.action(func(ctx context.Context, _ *cobra.Command) error { return c.cmdReplay(ctx, o) }),
	}
	f := cmd.Flags()
	f.Var(&o.types, "type", "replay only this event `type` (repeatable)")
	f.Int64Var(&o.from, "from-seq", 0, "first seq to replay")
	f.Int64Var(&o.to, "to-seq", 0, "last seq to replay (0: no limit)")
	f.StringVar(&o.since, "since", "", "created at or after: RFC 3339 time or an age such as 24h or 7d")
	f.StringVar(&o.until, "until", "", "created before: RFC 3339 time or an age")
	f.BoolVar(&o.all, "all", false, "replay every dispatched event (asks first on a terminal, else needs --yes)")
	f.StringVar(&o.exchange, "exchange", "", "publish the copies to this exchange instead of amqp.exchange")
	f.Float64Var(&o.rate, "rate", 0, "most events per second (0: as fast as confirms allow)")
	f.IntVar(&o.batch, "batch-size", defaultReplayBatch, "events read per page")
	f.BoolVar(&o.dryRun, "dry-run", false, "only count the selected events")
	f.BoolVar(&o.yes, "yes", false, "do not ask before replaying --all")
	f.BoolVar(&o.json, "json", false, "print the result (or the dry run's count) as one JSON object")
	return cmd
}

func (c *cliEnv) configCommand() *cobra.Command {
	var asJSON bool
	check := &cobra.Command{
		Use:   "check",
		Short: "validate the configuration and print it with secrets redacted",
		Long: `Loads the configuration as run would (file, environment, defaults) and
validates every key without connecting to anything. Valid: prints the
effective configuration, passwords redacted, and exits 0. Invalid: names
every bad key on stderr and exits 2.`,
		Args: cobra.NoArgs,
		RunE: c.action(func(context.Context, *cobra.Command) error { return c.configCheck(asJSON) }),
	}
	check.Flags().BoolVar(&asJSON, "json", false, "print the effective configuration as JSON instead of YAML")
	return group(&cobra.Command{
		Use:   "config",
		Short: "check the configuration",
	}, check)
}

func (c *cliEnv) versionCommand() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "version",
		Short: "print version information",
		Args:  cobra.NoArgs,
		RunE: c.action(func(context.Context, *cobra.Command) error {
			if asJSON {
				return writeJSON(c.stdout, versionInfo())
			}
			fmt.Fprint(c.stdout, versionText())
			return nil
		}),
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print one JSON object")
	return cmd
}

type versionReport struct {
	Version string `json:"version"`
	Commit  string `json:"commit"`
	Go      string `json:"go"`
}

func versionInfo() versionReport {
	v := versionReport{Version: version, Commit: buildCommit()}
	if bi, ok := debug.ReadBuildInfo(); ok {
		v.Go = bi.GoVersion
	}
	return v
}

func versionText() string {
	v := versionInfo()
	return fmt.Sprintf("outbox-relay %s\ncommit %s\ngo %s\n", v.Version, v.Commit, v.Go)
}
