package main

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/internal/ident"
)

// cmdNotify switches the table's statement-level NOTIFY trigger. It is off
// by default because NOTIFY serialises committing producers on a
// database-wide lock; wake.mode: notify wants it on.
func (c *cliEnv) cmdNotify(ctx context.Context, args []string) error {
	fs, path := c.flags("notify")
	if len(args) == 0 {
		return usagef("notify needs an action: enable, disable or status")
	}
	action := args[0]
	if err := parse(fs, args[1:]); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usagef("notify %s: unexpected argument %q", action, fs.Arg(0))
	}
	if action != "enable" && action != "disable" && action != "status" {
		return usagef("notify: unknown action %q: use enable, disable or status", action)
	}
	cfg, err := c.loadConfig(*path, "postgres.")
	if err != nil {
		return err
	}
	conn, err := pgx.Connect(ctx, cfg.Postgres.DSN)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	t := ident.Table{Schema: cfg.Postgres.Schema, Name: cfg.Postgres.Table}
	switch action {
	case "enable", "disable":
		verb := "ENABLE"
		if action == "disable" {
			verb = "DISABLE"
		}
		if _, err := conn.Exec(ctx, "ALTER TABLE "+t.Quoted()+" "+verb+" TRIGGER "+t.Local("notify")); err != nil {
			return fmt.Errorf("notify %s on %s: %w", action, t, err)
		}
		fmt.Fprintf(c.stdout, "NOTIFY trigger on %s %sd\n", t, action)
	case "status":
		var enabled bool
		err := conn.QueryRow(ctx, `SELECT tgenabled IN ('O', 'A') FROM pg_trigger WHERE tgrelid = $1::regclass AND tgname = $2`,
			t.Quoted(), t.Name+"_notify").Scan(&enabled)
		if err != nil {
			return fmt.Errorf("notify status of %s (is the table migrated?): %w", t, err)
		}
		state := "disabled"
		if enabled {
			state = "enabled"
		}
		fmt.Fprintf(c.stdout, "NOTIFY trigger on %s is %s\n", t, state)
	}
	return nil
}
