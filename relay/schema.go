package relay

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"

	"github.com/outbox-relay/outbox-relay/internal/outboxsql"
	"github.com/outbox-relay/outbox-relay/metrics"
)

// ErrTableMissing is returned by Run when the outbox table does not exist.
var ErrTableMissing = errors.New("outbox table does not exist")

// ErrSchemaOutdated is returned by Run when the outbox table lacks columns
// of a migration this relay needs.
var ErrSchemaOutdated = errors.New("outbox table is missing migrations")

// ErrPrivilegeMissing is returned by Run when the relay's database role may
// not settle a batch as relay.on_dispatch says: every batch would be
// published and then fail to commit, again and again.
var ErrPrivilegeMissing = errors.New("the relay's database role lacks a privilege")

// checkSchema fails with ErrTableMissing when the table is absent, with
// ErrSchemaOutdated when it lacks the routing columns or the archive of
// dispatched rows, with ErrPrivilegeMissing when the role may not remove
// settled rows (and archive them), and warns when the NOTIFY trigger
// disagrees with wake.mode.
func (r *Relay) checkSchema(ctx context.Context, pool *pgxpool.Pool) error {
	var exists bool
	if err := pool.QueryRow(ctx, tableExists, r.table.Quoted()).Scan(&exists); err != nil {
		return fmt.Errorf("check outbox table: %w", err)
	}
	if !exists {
		return fmt.Errorf("%w: %s (run `outbox-relay migrate up`, or check postgres.schema and postgres.table)", ErrTableMissing, r.table)
	}
	var routing int
	if err := pool.QueryRow(ctx, routingColumns, r.table.Quoted()).Scan(&routing); err != nil {
		return fmt.Errorf("check outbox columns: %w", err)
	}
	if routing != 2 {
		return fmt.Errorf("%w: %s has no routing_key and exchange columns (run `outbox-relay migrate up`)", ErrSchemaOutdated, r.table)
	}
	archive := outboxsql.Archive(r.table)
	if err := pool.QueryRow(ctx, tableExists, archive).Scan(&exists); err != nil {
		return fmt.Errorf("check the archive table: %w", err)
	}
	if !exists {
		return fmt.Errorf("%w: %s has no archive of dispatched rows, %s (run `outbox-relay migrate up`)", ErrSchemaOutdated, r.table, archive)
	}
	if err := r.checkPrivileges(ctx, pool, archive); err != nil {
		return err
	}
	if r.cfg.Relay.Ordering == OrderingPartitionKey {
		if err := pool.QueryRow(ctx, `SELECT pg_get_serial_sequence($1, 'seq')`, r.table.Quoted()).Scan(&r.ord.seqName); err != nil {
			return fmt.Errorf("find the seq sequence of %s: %w", r.table, err)
		}
	}
	var enabled bool
	if err := pool.QueryRow(ctx, r.q.notifyTrigger, r.table.Quoted(), outboxsql.NotifyTrigger(r.table)).Scan(&enabled); err != nil {
		return fmt.Errorf("check notify trigger: %w", err)
	}
	switch {
	case r.cfg.Wake.Mode == WakeNotify && !enabled:
		r.log.Warn("wake.mode is notify but the table's NOTIFY trigger is disabled: events wait for the fallback poll; run `outbox-relay notify enable`",
			zap.Duration("poll_interval", r.cfg.Wake.PollInterval))
	case r.cfg.Wake.Mode == WakePoll && enabled:
		r.log.Warn("the table's NOTIFY trigger is enabled but wake.mode is poll: producers pay for NOTIFY for nothing; run `outbox-relay notify disable`")
	}
	r.setLink(metrics.LinkPostgres, nil)
	return nil
}

// checkPrivileges fails with ErrPrivilegeMissing when the role cannot
// claim or settle a batch: claims select and lock rows (FOR UPDATE needs
// UPDATE), failures update them, both on_dispatch modes delete them from
// the outbox table, and mark inserts them into the archive.
func (r *Relay) checkPrivileges(ctx context.Context, pool *pgxpool.Pool, archive string) error {
	var canSelect, canUpdate, canDelete, canArchive bool
	if err := pool.QueryRow(ctx, tablePrivileges, r.table.Quoted(), archive).Scan(&canSelect, &canUpdate, &canDelete, &canArchive); err != nil {
		return fmt.Errorf("check privileges: %w", err)
	}
	var missing []string
	for _, p := range []struct {
		held bool
		what string
	}{
		{canSelect, "SELECT on " + r.table.Quoted()},
		{canUpdate, "UPDATE on " + r.table.Quoted()},
		{canDelete, "DELETE on " + r.table.Quoted()},
		{canArchive || r.cfg.Relay.OnDispatch != OnDispatchMark, "INSERT on " + archive},
	} {
		if !p.held {
			missing = append(missing, p.what)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("%w: the relay's role needs %s (relay.on_dispatch %s; see the grants in docs/operations.md)",
			ErrPrivilegeMissing, strings.Join(missing, " and "), r.cfg.Relay.OnDispatch)
	}
	return nil
}

func isUndefinedTable(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "42P01"
}

// schemaFailure is whether err is one that the start-up checks explain: a
// table gone (42P01: the outbox table dropped, the archive dropped by a
// migrate down) or a privilege revoked (42501), which no retry can get past.
func schemaFailure(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && (pgErr.Code == "42P01" || pgErr.Code == "42501")
}
