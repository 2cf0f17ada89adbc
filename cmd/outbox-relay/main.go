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

// usageError is a bad command line: exit 2 with its message.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error { return &usageError{fmt.Sprintf(format, args...)} }

func run(args, environ []string, stdin io.Reader, stdout, stderr io.Writer) int {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	env := &cliEnv{stdin: stdin, stdout: stdout, stderr: stderr, environ: environ, stopSignals: stop}
	root := env.rootCommand()
	root.SetArgs(args)
	err := root.ExecuteContext(ctx)
	if err != nil && !env.entered {
		// cobra's own errors (unknown command, bad flag or argument) come
		// before any command ran: the command line is wrong.
		var ue *usageError
		if !errors.As(err, &ue) {
			err = usagef("%v (see outbox-relay --help)", err)
		}
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
