package outbox_test

import (
	"context"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/schema"
)

// TestWriteRoutingOverrides: RoutingKey and Exchange land in their columns
// (NULL when unset), through pgx and database/sql; on a table not yet
// migrated to the routing columns, events without overrides are still
// written and events with them fail, naming the migration.
func TestWriteRoutingOverrides(t *testing.T) {
	t.Parallel()
	o := testenv.NewOutbox(t)
	ctx := context.Background()
	w, err := outbox.NewWriter(o.Schema, o.Table.Name)
	if err != nil {
		t.Fatal(err)
	}
	routed := outbox.NewEvent("invoice.paid", []byte(`{}`))
	routed.RoutingKey, routed.Exchange = "tenant-7", "billing.events"
	keyOnly := outbox.NewEvent("invoice.paid", []byte(`{}`))
	keyOnly.RoutingKey = "region.eu"
	plain := outbox.NewEvent("lesson.published", []byte(`{}`))
	if err := pgx.BeginFunc(ctx, o.Pool, func(tx pgx.Tx) error { return w.Write(ctx, tx, routed, plain) }); err != nil {
		t.Fatal(err)
	}
	sqlTx, err := o.DB(t).BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.WriteSQL(ctx, sqlTx, keyOnly); err != nil {
		t.Fatal(err)
	}
	if err := sqlTx.Commit(); err != nil {
		t.Fatal(err)
	}
	want := map[string]string{routed.ID.String(): "tenant-7 billing.events", keyOnly.ID.String(): "region.eu NULL", plain.ID.String(): "NULL NULL"}
	rows, err := o.Pool.Query(ctx, `SELECT id::text, coalesce(routing_key, 'NULL') || ' ' || coalesce(exchange, 'NULL') FROM `+o.Table.Quoted())
	if err != nil {
		t.Fatal(err)
	}
	got, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) ([2]string, error) {
		var v [2]string
		return v, r.Scan(&v[0], &v[1])
	})
	if err != nil || len(got) != 3 {
		t.Fatalf("rows %v, %v", got, err)
	}
	for _, g := range got {
		if want[g[0]] != g[1] {
			t.Errorf("event %s: routing_key exchange = %s, want %s", g[0], g[1], want[g[0]])
		}
	}

	m, err := schema.NewMigrator(o.DB(t), o.Schema, o.Table.Name)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.DownTo(ctx, 2); err != nil {
		t.Fatal(err)
	}
	if err := pgx.BeginFunc(ctx, o.Pool, func(tx pgx.Tx) error { return w.Write(ctx, tx, outbox.NewEvent("a", []byte{})) }); err != nil {
		t.Errorf("an event without overrides, before the migration: %v", err)
	}
	later := outbox.NewEvent("invoice.paid", []byte(`{}`))
	later.Exchange = "billing.events"
	err = pgx.BeginFunc(ctx, o.Pool, func(tx pgx.Tx) error { return w.Write(ctx, tx, later) })
	if err == nil || !strings.Contains(err.Error(), "migrate up") {
		t.Errorf("an event with overrides, before the migration: %v, want an error naming the migration", err)
	}
}
