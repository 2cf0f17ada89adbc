// Command outbox-relay publishes the rows of a transactional outbox table to
// RabbitMQ. Run `outbox-relay help` for its subcommands.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

// Exit codes.
const (
	exitOK     = 0
	exitFailed = 1 // runtime failure
	exitUsage  = 2 // bad arguments or configuration
)

func main() { os.Exit(run(os.Args[1:], os.Environ(), os.Stdin, os.Stdout, os.Stderr)) }

const usage = `outbox-relay publishes a transactional outbox table to RabbitMQ.

Usage:
  outbox-relay run      --config FILE      relay events until SIGTERM/SIGINT
  outbox-relay migrate  up|down|status     apply, roll back or show schema migrations
  outbox-relay notify   enable|disable|status
                                           switch the table's NOTIFY trigger (wake.mode: notify)
  outbox-relay status   [--json]           backlog, dead events, recent dispatches, schema version
  outbox-relay dead     list|retry|purge   inspect, retry or delete dead events (dead help)
  outbox-relay replay   [selection]        publish dispatched events again (replay -h)
  outbox-relay version                     print version information

Every command takes --config FILE; every key can also be set by environment,
e.g. OUTBOX_RELAY_POSTGRES_DSN for postgres.dsn (see config.example.yaml).
`

// usageError is a bad command line: exit 2 with its message.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error { return &usageError{fmt.Sprintf(format, args...)} }

func run(args, environ []string, stdin io.Reader, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return exitUsage
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	env := &cliEnv{stdin: stdin, stdout: stdout, stderr: stderr, environ: environ, stopSignals: stop}
	var err error
	switch cmd, rest := args[0], args[1:]; cmd {
	case "run":
		err = env.cmdRun(ctx, rest)
	case "migrate":
		err = env.cmdMigrate(ctx, rest)
	case "notify":
		err = env.cmdNotify(ctx, rest)
	case "status":
		err = env.cmdStatus(ctx, rest)
	case "dead":
		err = env.cmdDead(ctx, rest)
	case "replay":
		err = env.cmdReplay(ctx, rest)
	case "version", "--version":
		err = env.cmdVersion(rest)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return exitOK
	default:
		err = usagef("unknown command %q\n\n%s", cmd, usage)
	}
	return exitCode(err, stderr)
}

// exitCode prints err and maps it to an exit status: 2 for usage and
// configuration errors, 1 for everything else.
func exitCode(err error, stderr io.Writer) int {
	if err == nil {
		return exitOK
	}
	var ue *usageError
	var ce *configError
	switch {
	case errors.As(err, &ue):
		fmt.Fprintln(stderr, "outbox-relay:", ue.msg)
		return exitUsage
	case errors.As(err, &ce):
		fmt.Fprintln(stderr, "outbox-relay: invalid configuration:")
		for _, line := range ce.lines() {
			fmt.Fprintln(stderr, "  "+line)
		}
		return exitUsage
	default:
		fmt.Fprintln(stderr, "outbox-relay:", err)
		return exitFailed
	}
}
