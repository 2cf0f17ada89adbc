package main

import (
	"context"
	"fmt"
	"strconv"
	"text/tabwriter"

	"github.com/pressly/goose/v3"

	"github.com/outbox-relay/outbox-relay/internal/ident"
	"github.com/outbox-relay/outbox-relay/schema"
)

func (c *cliEnv) cmdMigrate(ctx context.Context, args []string) error {
	fs, path := c.flags("migrate")
	to := fs.String("to", "", "down: roll back to this version (0 removes the outbox table)")
	if len(args) == 0 {
		return usagef("migrate needs an action: up, down or status")
	}
	action := args[0]
	if err := parse(fs, args[1:]); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usagef("migrate %s: unexpected argument %q", action, fs.Arg(0))
	}
	if action != "up" && action != "down" && action != "status" {
		return usagef("migrate: unknown action %q: use up, down or status", action)
	}
	cfg, err := c.loadConfig(*path, "postgres.")
	if err != nil {
		return err
	}
	db, closeDB, err := openDB(ctx, cfg.Postgres)
	if err != nil {
		return err
	}
	defer closeDB()
	mig, err := schema.NewMigrator(db, cfg.Postgres.Schema, cfg.Postgres.Table)
	if err != nil {
		return err
	}
	table := ident.Table{Schema: cfg.Postgres.Schema, Name: cfg.Postgres.Table}
	switch action {
	case "up":
		res, err := mig.Up(ctx)
		if err != nil {
			return fmt.Errorf("migrate up %s: %w", table, err)
		}
		for _, r := range res {
			fmt.Fprintf(c.stdout, "applied %s (%s)\n", r.Source.Path, r.Duration.Round(1e6))
		}
		v, err := mig.Version(ctx)
		if err != nil {
			return err
		}
		fmt.Fprintf(c.stdout, "%s is at version %d (%d applied now)\n", table, v, len(res))
	case "down":
		var res []*goose.MigrationResult
		if *to != "" {
			v, perr := strconv.ParseInt(*to, 10, 64)
			if perr != nil || v < 0 {
				return usagef("migrate down --to: %q is not a version number (0 or more)", *to)
			}
			res, err = mig.DownTo(ctx, v)
		} else {
			var r *goose.MigrationResult
			r, err = mig.Down(ctx)
			if r != nil {
				res = append(res, r)
			}
		}
		if err != nil {
			return fmt.Errorf("migrate down %s: %w", table, err)
		}
		for _, r := range res {
			fmt.Fprintf(c.stdout, "rolled back %s\n", r.Source.Path)
		}
		v, err := mig.Version(ctx)
		if err != nil {
			return err
		}
		fmt.Fprintf(c.stdout, "%s is at version %d\n", table, v)
	case "status":
		st, err := mig.Status(ctx)
		if err != nil {
			return fmt.Errorf("migrate status %s: %w", table, err)
		}
		tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "VERSION\tSTATE\tAPPLIED AT\tMIGRATION")
		for _, s := range st {
			at := "-"
			if !s.AppliedAt.IsZero() {
				at = s.AppliedAt.Format("2006-01-02 15:04:05")
			}
			fmt.Fprintf(tw, "%d\t%s\t%s\t%s\n", s.Source.Version, s.State, at, s.Source.Path)
		}
		return tw.Flush()
	}
	return nil
}
