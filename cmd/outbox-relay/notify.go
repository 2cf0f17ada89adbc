package main

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
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
	conn, q, t, err := c.openOutbox(ctx, *path) // redacts connect errors, checks the table
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	switch action {
	case "enable", "disable":
		stmt := q.notifyEnable
		if action == "disable" {
			stmt = q.notifyDisable
		}
		if _, err := conn.Exec(ctx, stmt); err != nil {
			return fmt.Errorf("notify %s on %s: %w", action, t, err)
		}
		fmt.Fprintf(c.stdout, "NOTIFY trigger on %s %sd\n", t, action)
	case "status":
		var enabled *bool
		err := conn.QueryRow(ctx, q.notifyTrigger, t.Quoted(), t.Name+"_notify").Scan(&enabled)
		if errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("%s has no NOTIFY trigger (run `outbox-relay migrate up`)", t)
		}
		if err != nil {
			return fmt.Errorf("notify status of %s: %w", t, err)
		}
		state := "disabled"
		if enabled != nil && *enabled {
			state = "enabled"
		}
		fmt.Fprintf(c.stdout, "NOTIFY trigger on %s is %s\n", t, state)
	}
	return nil
}
