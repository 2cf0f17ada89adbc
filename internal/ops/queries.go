package ops

import (
	"fmt"

	"github.com/outbox-relay/outbox-relay/internal/ident"
	"github.com/outbox-relay/outbox-relay/internal/outboxsql"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/schema"
)

// queries holds every SQL statement of the operator's commands, rendered
// once for the table. The table name is validated and quoted
// (internal/ident); everything else is a parameter.
type queries struct {
	tableExists string

	// dead list / retry / purge.
	deadList   string
	deadTotal  string
	deadSelect string
	deadRetry  string
	deadPurge  string
	idStates   string // EventStates
	wakeRelay  string

	// status.
	statusBacklog    string
	statusDispatched string
	statusTypes      string
	archive          string // quoted name of the archive of dispatched rows
	versionTable     string // quoted name of goose's version table
	schemaVersion    string
	notifyTrigger    string

	// notify enable / disable.
	notifyEnable  string
	notifyDisable string

	// ordered mode: lease owners and backlogs.
	partitionOwners  string
	partitionBacklog string

	// replay.
	replayCount string
	replayPage  string
}

// Predicates of the partial indexes pending and dead: queries repeat them
// so that the planner can use the indexes.
const (
	pendingRows = outboxsql.Pending
	deadRows    = outboxsql.Dead
)

// replaySelection selects dispatched rows to replay: $1 from
// seq, $2 to seq (0: none), $3 since, $4 until (NULL: none), $5 types
// (empty: all).
const replaySelection = `seq >= $1 AND ($2 = 0 OR seq <= $2)
  AND ($3::timestamptz IS NULL OR created_at >= $3) AND ($4::timestamptz IS NULL OR created_at < $4)
  AND (cardinality($5::text[]) = 0 OR event_type = ANY($5))`

// replayRows are the rows a replay selects from, the archive (%[1]s) and
// the outbox table (%[2]s), with a dispatched_at IS NOT NULL condition.
const replayRows = `(SELECT ` + outboxsql.Columns + ` FROM %[1]s UNION ALL SELECT ` + outboxsql.Columns + ` FROM %[2]s)`

// deadMatch selects dead rows for list, retry and purge. Each parameter is a
// filter; NULL switches it off, so one fixed statement serves every
// combination of flags (see DeadFilter.args):
//
//	$1 uuid[]    ids (--id)
//	$2 text[]    event types (--type)
//	$3 interval  died more than this long ago (--older-than)
//	$4 interval  died at most this long ago (--newer-than)
//	$5 bigint[]  seqs: exactly the rows an operator confirmed
//
// Ages are measured against the database's clock, not this process's.
const deadMatch = deadRows + `
  AND ($1::uuid[] IS NULL OR id = ANY($1::uuid[]))
  AND ($2::text[] IS NULL OR event_type = ANY($2::text[]))
  AND ($3::interval IS NULL OR dead_at < now() - $3::interval)
  AND ($4::interval IS NULL OR dead_at >= now() - $4::interval)
  AND ($5::bigint[] IS NULL OR seq = ANY($5::bigint[]))`

func newQueries(t ident.Table) queries {
	tbl, archive := t.Quoted(), outboxsql.Archive(t)
	versionTable := t.Derived(schema.VersionTableSuffix)
	return queries{
		tableExists: `SELECT to_regclass($1) IS NOT NULL`,

		// Newest first, which is the dead index read backwards. $6 asks
		// for the payload, $7 is the limit.
		deadList: fmt.Sprintf(`SELECT seq, id, event_type, partition_key, content_type, headers,
       correlation_id, created_at, available_at, attempts, last_error, dead_at,
       extract(epoch FROM now() - dead_at)::float8,
       CASE WHEN $6::bool THEN payload END
FROM %s
WHERE `+deadMatch+`
ORDER BY dead_at DESC, seq DESC
LIMIT $7`, tbl),

		deadTotal: fmt.Sprintf(`SELECT count(*) FROM %s WHERE `+deadRows, tbl),

		// The rows a confirmation prompt counts; the action then passes
		// them back as $5, so rows that die while the operator reads the
		// prompt are not swept up with the ones confirmed. Dead rows are
		// few (they are parked failures), so the array stays small.
		deadSelect: fmt.Sprintf(`SELECT seq FROM %s WHERE `+deadMatch+` ORDER BY seq`, tbl),

		// Make dead rows due again with a fresh attempt budget. last_error
		// stays for the record until the next failure overwrites it.
		deadRetry: fmt.Sprintf(`UPDATE %s
SET attempts = 0, dead_at = NULL, available_at = now()
WHERE `+deadMatch+`
RETURNING id`, tbl),

		deadPurge: fmt.Sprintf(`DELETE FROM %s WHERE `+deadMatch, tbl),

		// Why an --id was not retried: found in the archive, or in the
		// outbox table (where an older relay marked rows in place).
		idStates: fmt.Sprintf(`SELECT id, CASE WHEN dead_at IS NOT NULL THEN 'dead'
                 WHEN dispatched_at IS NOT NULL THEN 'dispatched'
                 ELSE 'pending' END
FROM %s
WHERE id = ANY($1::uuid[])
UNION ALL
SELECT id, 'dispatched' FROM %s WHERE id = ANY($1::uuid[])`, tbl, archive),

		// Retried rows are updates, which the insert trigger does not
		// announce: wake a relay in wake.mode notify ourselves (sent at
		// commit; nobody listens in poll mode, which polls anyway).
		wakeRelay: `SELECT pg_notify($1, '')`,

		// Both counts come from one pass over the pending index. The oldest
		// age is of due rows only, like the oldest-pending gauge: a row
		// waiting out its retry backoff is not late.
		statusBacklog: fmt.Sprintf(`SELECT p.pending, p.due,
       (SELECT extract(epoch FROM now() - created_at)::float8 FROM %[1]s WHERE `+pendingRows+` AND available_at <= now() ORDER BY seq LIMIT 1),
       (SELECT count(*) FROM %[1]s WHERE `+deadRows+`),
       now()
FROM (SELECT count(*) AS pending, count(*) FILTER (WHERE available_at <= now()) AS due
      FROM %[1]s WHERE `+pendingRows+`) p`, tbl),

		// Dispatched rows are archived in about dispatched_at order: the
		// BRIN index on it finds the last 5 minutes' without reading the
		// rest. Rows marked in place in the outbox table (before migration
		// 6, or by an older relay during a rolling upgrade) are not
		// counted: the outbox has no index on dispatched_at to find them.
		statusDispatched: fmt.Sprintf(`SELECT count(*) FILTER (WHERE dispatched_at >= now() - interval '1 minute'), count(*)
FROM %s
WHERE dispatched_at >= now() - interval '5 minutes'`, archive),

		// Pending and dead counts per event type, from the two partial
		// indexes (the pending side reads every pending row: on a large
		// backlog this is the most expensive statement of status). The
		// window counts all types before LIMIT $1 cuts the list.
		statusTypes: fmt.Sprintf(`SELECT event_type, sum(pending)::bigint, sum(dead)::bigint, count(*) OVER ()
FROM (SELECT event_type, count(*) AS pending, 0::bigint AS dead
      FROM %[1]s WHERE `+pendingRows+` GROUP BY event_type
      UNION ALL
      SELECT event_type, 0::bigint, count(*)
      FROM %[1]s WHERE `+deadRows+` GROUP BY event_type) c
GROUP BY event_type
ORDER BY 2 DESC, 3 DESC, event_type
LIMIT $1`, tbl),

		// Read goose's version table directly: asking goose (Migrator.Version)
		// would create the table when it is missing, and status must not
		// write. goose deletes a version's row when it is rolled back.
		archive:       archive,
		versionTable:  versionTable,
		schemaVersion: fmt.Sprintf(`SELECT coalesce(max(version_id), 0) FROM %s`, versionTable),

		notifyTrigger: outboxsql.NotifyEnabled,
		notifyEnable:  outboxsql.SetNotify(t, true),
		notifyDisable: outboxsql.SetNotify(t, false),

		// The live leases grouped by replica.
		partitionOwners: fmt.Sprintf(`SELECT r.owner, r.pid, r.application_name, r.client_addr, r.since,
       array_agg(l.partition ORDER BY l.partition)
FROM %s l JOIN %s r ON r.owner = l.owner
WHERE l.expires_at > now()
GROUP BY r.owner, r.pid, r.application_name, r.client_addr, r.since
ORDER BY r.pid, r.owner`, t.Derived("leases"), t.Derived("relays")),

		// Pending keyed rows per partition, of $1 partitions.
		partitionBacklog: fmt.Sprintf(`SELECT %s AS p, count(*) FROM %s
WHERE `+pendingRows+` AND partition_key IS NOT NULL GROUP BY p`, outboxsql.PartitionOf("partition_key", 1), tbl),

		// A replay's selection, counted and read in pages of $6 rows in seq
		// order: from the archive, and from the outbox table's rows marked
		// dispatched in place (before migration 6, or by an older relay).
		// The branches carry no WHERE of their own, so the planner flattens
		// the UNION ALL and pushes the conditions into both: the page is a
		// Merge Append of two index scans on seq (the archive's index and
		// the outbox's primary key), not a sort of the whole history.
		replayCount: fmt.Sprintf(`SELECT count(*) FROM `+replayRows+` r
WHERE dispatched_at IS NOT NULL AND `+replaySelection, archive, tbl),
		replayPage: fmt.Sprintf(`SELECT `+relay.MessageColumns+` FROM `+replayRows+` r
WHERE dispatched_at IS NOT NULL AND `+replaySelection+`
ORDER BY seq LIMIT $6`, archive, tbl),
	}
}
