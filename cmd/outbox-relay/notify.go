package main

import (
	"context"
	"fmt"

	"github.com/outbox-relay/outbox-relay/internal/ops"
)

// cmdNotify switches the table's statement-level NOTIFY trigger (see
// ops.Outbox.SetNotify for why it is off by default) or shows its state.
func (c *cliEnv) cmdNotify(ctx context.Context, action string, asJSON bool) error {
	conn, out, err := c.openOutbox(ctx) // redacts connect errors, checks the table
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	t := out.Table()
	switch action {
	case "enable", "disable":
		if err := out.SetNotify(ctx, conn, action == "enable"); err != nil {
			return err
		}
		if asJSON {
			return writeJSON(c.stdout, notifyReport{Table: t.String(), Trigger: action + "d"})
		}
		fmt.Fprintf(c.stdout, "NOTIFY trigger on %s %sd\n", t, action)
	case "status":
		state, err := out.NotifyState(ctx, conn)
		if err != nil {
			return fmt.Errorf("notify status of %s: %w", t, err)
		}
		if state == ops.NotifyMissing {
			return fmt.Errorf("%s has no NOTIFY trigger (run `outbox-relay migrate up`)", t)
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
