package main

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/outbox-relay/outbox-relay/internal/outboxsql"
)

// cmdNotify switches the table's statement-level NOTIFY trigger. It is off
// by default because NOTIFY serialises committing producers on a
// database-wide lock; wake.mode: notify wants it on.
func (c *cliEnv) cmdNotify(ctx context.Context, action string, asJSON bool) error {
	conn, q, t, err := c.openOutbox(ctx) // redacts connect errors, checks the table
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
		if asJSON {
			return writeJSON(c.stdout, notifyReport{Table: t.String(), Trigger: action + "d"})
		}
		fmt.Fprintf(c.stdout, "NOTIFY trigger on %s %sd\n", t, action)
	case "status":
		var enabled *bool
		err := conn.QueryRow(ctx, q.notifyTrigger, t.Quoted(), outboxsql.NotifyTrigger(t)).Scan(&enabled)
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
		if asJSON {
			return writeJSON(c.stdout, notifyReport{Table: t.String(), Trigger: state})
		}
		fmt.Fprintf(c.stdout, "NOTIFY trigger on %s is %s\n", t, state)
	}
	return nil
}

// notifyReport is what notify prints with --json.
type notifyReport struct {
	Table   string `json:"table"`
	Trigger string `json:"trigger"` // enabled or disabled
}
