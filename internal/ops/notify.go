package ops

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/internal/outboxsql"
)

// States of the NOTIFY trigger, as NotifyState reports them.
const (
	NotifyEnabled  = "enabled"
	NotifyDisabled = "disabled"
	NotifyMissing  = "missing" // the migration was not applied
)

// NotifyState reads whether the table's NOTIFY trigger fires.
func (o *Outbox) NotifyState(ctx context.Context, db DB) (string, error) {
	var enabled *bool
	err := db.QueryRow(ctx, o.q.notifyTrigger, o.table.Quoted(), outboxsql.NotifyTrigger(o.table)).Scan(&enabled)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return NotifyMissing, nil
	case err != nil:
		return "", err
	case enabled != nil && *enabled:
		return NotifyEnabled, nil
	default:
		return NotifyDisabled, nil
	}
}

// SetNotify enables or disables the table's NOTIFY trigger. It is off by
// default because NOTIFY serialises committing producers on a database-wide
// lock; wake.mode: notify wants it on.
func (o *Outbox) SetNotify(ctx context.Context, db DB, enabled bool) error {
	stmt := o.q.notifyDisable
	if enabled {
		stmt = o.q.notifyEnable
	}
	if _, err := db.Exec(ctx, stmt); err != nil {
		return fmt.Errorf("notify %s on %s: %w", map[bool]string{true: "enable", false: "disable"}[enabled], o.table, err)
	}
	return nil
}
