package main

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"
)

// writeReference writes the CLI reference (docs/cli.md) from the command
// tree itself, so that it cannot drift from the code (TestCLIReference).
func writeReference(w io.Writer, root *cobra.Command) {
	fmt.Fprint(w, "# Command reference\n\n")
	fmt.Fprint(w, "Generated from the code by `UPDATE_CLI_REFERENCE=1 go test ./cmd/outbox-relay -run TestCLIReference`;\n")
	fmt.Fprint(w, "a test fails when it is out of date.\n\n")
	fmt.Fprintf(w, "```\n%s\n```\n\n", root.Long)
	fmt.Fprintf(w, "Global flags:\n\n```\n%s```\n", root.PersistentFlags().FlagUsages())
	var walk func(cmd *cobra.Command)
	walk = func(cmd *cobra.Command) {
		for _, sub := range cmd.Commands() {
			if sub.Hidden || sub.Name() == "help" || sub.Name() == "completion" {
				continue
			}
			fmt.Fprintf(w, "\n## %s\n\n%s.\n\n```\n%s\n```\n", sub.CommandPath(), upperFirst(sub.Short), sub.UseLine())
			if sub.Long != "" {
				fmt.Fprintf(w, "\n%s\n", sub.Long)
			}
			if flags := sub.LocalNonPersistentFlags(); flags.HasAvailableFlags() {
				fmt.Fprintf(w, "\nFlags:\n\n```\n%s```\n", flags.FlagUsages())
			}
			walk(sub)
		}
	}
	walk(root)
	fmt.Fprint(w, "\n## outbox-relay completion\n\n")
	fmt.Fprint(w, "`outbox-relay completion bash|zsh|fish|powershell` prints a shell completion script;\n")
	fmt.Fprint(w, "`outbox-relay completion bash --help` says how to install it.\n")
}

// writeSummary writes the README's command list: one line per command.
func writeSummary(w io.Writer, root *cobra.Command) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	var walk func(cmd *cobra.Command)
	walk = func(cmd *cobra.Command) {
		for _, sub := range cmd.Commands() {
			if sub.Hidden || sub.Name() == "help" {
				continue
			}
			if sub.HasAvailableSubCommands() && sub.Name() != "completion" {
				walk(sub)
				continue
			}
			fmt.Fprintf(tw, "%s\t%s\n", sub.CommandPath(), sub.Short)
		}
	}
	walk(root)
	_ = tw.Flush()
}

func upperFirst(s string) string {
	if s == "" {
		return s
	}
	return strings.ToUpper(s[:1]) + s[1:]
}
