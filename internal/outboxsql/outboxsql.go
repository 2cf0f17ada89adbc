// Package outboxsql is the one place that writes the SQL every user of the
// outbox table must agree on: the predicates of its partial indexes, the
// expression of a key's partition, and the statements about its NOTIFY
// trigger. The engine, the operations commands, the bench and the soak test
// all take them from here, so a predicate cannot drift from its index.
package outboxsql

import (
	"fmt"
	"strings"

	"github.com/outbox-relay/outbox-relay/internal/ident"
)

// Predicates of the partial indexes of schema/migrations, verbatim (a test
// reads the migrations): a query that repeats one lets the planner use the
// index.
const (
	// Pending selects rows still to publish: indexes pending and pending_key.
	Pending = `dispatched_at IS NULL AND dead_at IS NULL`
	// Dead selects parked rows: index dead.
	Dead = `dead_at IS NOT NULL`
)

// Columns are the columns of the outbox table, in the order of its
// definition, and of its archive (Archive), which has the same ones. The
// relay's move to the archive, the archive's migration and the tests that
// look at both tables list them from here; a migration that adds a column to
// one table adds it to the other (a test compares them with the tables).
const Columns = `tx_id, seq, id, event_type, partition_key, payload, content_type, headers, correlation_id,
created_at, available_at, attempts, last_error, dispatched_at, dead_at, routing_key, exchange`

// Archive is the table that dispatched rows move to with relay.on_dispatch:
// mark (migration 00006): "schema"."table_dispatched", quoted.
func Archive(t ident.Table) string { return t.Derived(ArchiveSuffix) }

// ArchiveSuffix derives the archive's name from the table's: outbox →
// outbox_dispatched.
const ArchiveSuffix = "dispatched"

// Qualified returns predicate pred (Pending or Dead) with each column
// qualified by alias, for queries that join or nest the table.
func Qualified(alias, pred string) string {
	terms := strings.Split(pred, " AND ")
	for i, term := range terms {
		terms[i] = alias + "." + term
	}
	return strings.Join(terms, " AND ")
}

// PartitionOf is the SQL expression for the virtual partition of the key in
// column col, given the partition count as parameter $n. The engine leases
// partitions by it and the operations commands count backlogs by it, so both
// must hash keys alike.
func PartitionOf(col string, n int) string {
	return fmt.Sprintf(`((hashtextextended(%s, 0) & 2147483647) %% $%d)::int4`, col, n)
}

// NotifyTrigger names the table's NOTIFY trigger as pg_trigger.tgname holds
// it (unquoted); the migration creates it disabled.
func NotifyTrigger(t ident.Table) string { return t.Name + "_notify" }

// NotifyEnabled reads whether trigger $2 of table $1 fires: 'O' (origin) and
// 'A' (always) do, 'D' does not. No row when the trigger is missing.
const NotifyEnabled = `SELECT tgenabled IN ('O', 'A') FROM pg_trigger WHERE tgrelid = $1::regclass AND tgname = $2`

// SetNotify returns the statement that enables or disables the table's
// NOTIFY trigger.
func SetNotify(t ident.Table, enabled bool) string {
	verb := "DISABLE"
	if enabled {
		verb = "ENABLE"
	}
	return fmt.Sprintf(`ALTER TABLE %s %s TRIGGER %s`, t.Quoted(), verb, t.Local("notify"))
}
