package main

import (
	"context"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/pressly/goose/v3"

	"github.com/outbox-relay/outbox-relay/internal/ident"
	"github.com/outbox-relay/outbox-relay/schema"
)

type migrateOptions struct {
	to    int64
	toSet bool // --to given
	yes   bool
	json  bool
}

// migrateReport is what migrate up and down print with --json.
type migrateReport struct {
	Table   string   `json:"table"`
	Version int64    `json:"version"`
	Applied []string `json:"applied,omitempty"`     // up
	Rolled  []string `json:"rolled_back,omitempty"` // down
}

type migrationState struct {
	Version   int64      `json:"version"`
	State     string     `json:"state"`
	AppliedAt *time.Time `json:"applied_at"`
	Migration string     `json:"migration"`
}

// openMigrator loads the configuration (only postgres.* must be valid) and
// opens the table's migrator.
func (c *cliEnv) openMigrator(ctx context.Context) (*schema.Migrator, ident.Table, func(), error) {
	cfg, err := c.loadConfig("postgres.")
	if err != nil {
		return nil, ident.Table{}, nil, err
	}
	table := ident.Table{Schema: cfg.Postgres.Schema, Name: cfg.Postgres.Table}
	db, closeDB, err := openDB(ctx, cfg.Postgres)
	if err != nil {
		return nil, table, nil, err
	}
	mig, err := schema.NewMigrator(db, cfg.Postgres.Schema, cfg.Postgres.Table)
	if err != nil {
		closeDB()
		return nil, table, nil, err
	}
	return mig, table, closeDB, nil
}

func (c *cliEnv) migrateUp(ctx context.Context, o migrateOptions) error {
	mig, table, closeDB, err := c.openMigrator(ctx)
	if err != nil {
		return err
	}
	defer closeDB()
	res, err := mig.Up(ctx)
	if err != nil {
		return fmt.Errorf("migrate up %s: %w", table, err)
	}
	v, err := mig.Version(ctx)
	if err != nil {
		return err
	}
	if o.json {
		return writeJSON(c.stdout, migrateReport{Table: table.String(), Version: v, Applied: sourcePaths(res)})
	}
	for _, r := range res {
		fmt.Fprintf(c.stdout, "applied %s (%s)\n", r.Source.Path, r.Duration.Round(1e6))
	}
	fmt.Fprintf(c.stdout, "%s is at version %d (%d applied now)\n", table, v, len(res))
	return nil
}

func (c *cliEnv) migrateDown(ctx context.Context, o migrateOptions) error {
	if o.toSet && o.to < 0 {
		return usagef("migrate down --to: %d is not a version number (0 or more)", o.to)
	}
	if err := c.needConfirmation("migrate down", o.yes); err != nil {
		return err
	}
	mig, table, closeDB, err := c.openMigrator(ctx)
	if err != nil {
		return err
	}
	defer closeDB()
	if !o.yes {
		from, err := mig.Version(ctx)
		if err != nil {
			return err
		}
		to, what := from-1, "roll back the last migration of"
		if o.toSet {
			to, what = o.to, "roll back"
		}
		if from <= max(to, 0) {
			fmt.Fprintf(c.stdout, "%s is at version %d: nothing to roll back\n", table, from)
			return nil
		}
		q := fmt.Sprintf("%s %s from version %d to %d?", what, table, from, max(to, 0))
		if to <= 0 {
			q = fmt.Sprintf("%s %s to version 0? This drops the table and every event in it.", what, table)
		}
		if err := c.confirm(q, "nothing rolled back"); err != nil {
			return err
		}
	}
	var res []*goose.MigrationResult
	if o.toSet {
		res, err = mig.DownTo(ctx, o.to)
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
	v, err := mig.Version(ctx)
	if err != nil {
		return err
	}
	if o.json {
		return writeJSON(c.stdout, migrateReport{Table: table.String(), Version: v, Rolled: sourcePaths(res)})
	}
	for _, r := range res {
		fmt.Fprintf(c.stdout, "rolled back %s\n", r.Source.Path)
	}
	fmt.Fprintf(c.stdout, "%s is at version %d\n", table, v)
	return nil
}

// sourcePaths lists the files of the migrations up or down ran, in order.
func sourcePaths(res []*goose.MigrationResult) []string {
	paths := []string{}
	for _, r := range res {
		paths = append(paths, r.Source.Path)
	}
	return paths
}

func (c *cliEnv) migrateStatus(ctx context.Context, o migrateOptions) error {
	mig, table, closeDB, err := c.openMigrator(ctx)
	if err != nil {
		return err
	}
	defer closeDB()
	st, err := mig.Status(ctx)
	if err != nil {
		return fmt.Errorf("migrate status %s: %w", table, err)
	}
	states := []migrationState{}
	for _, s := range st {
		ms := migrationState{Version: s.Source.Version, State: string(s.State), Migration: s.Source.Path}
		if !s.AppliedAt.IsZero() {
			at := s.AppliedAt
			ms.AppliedAt = &at
		}
		states = append(states, ms)
	}
	if o.json {
		return writeJSON(c.stdout, states)
	}
	tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "VERSION\tSTATE\tAPPLIED AT\tMIGRATION")
	for _, s := range states {
		at := "-"
		if s.AppliedAt != nil {
			at = s.AppliedAt.Format("2006-01-02 15:04:05")
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\n", s.Version, s.State, at, s.Migration)
	}
	return tw.Flush()
}

// migrateSQL prints the up migrations for the configured table. Only
// postgres.schema and postgres.table are read: no DSN is needed.
func (c *cliEnv) migrateSQL() error {
	cfg, err := c.loadConfig("postgres.schema", "postgres.table")
	if err != nil {
		return err
	}
	t := ident.Table{Schema: cfg.Postgres.Schema, Name: cfg.Postgres.Table}
	migs, err := schema.UpSQL(t)
	if err != nil {
		return err
	}
	fmt.Fprintf(c.stdout, "-- outbox-relay %s: up migrations for %s\n", version, t)
	fmt.Fprintf(c.stdout, "CREATE SCHEMA IF NOT EXISTS %s;\n", ident.Quote(t.Schema))
	for _, m := range migs {
		fmt.Fprintf(c.stdout, "\n-- version %d: %s\n%s", m.Version, m.Name, m.SQL)
	}
	return nil
}
