package relay

import (
	"fmt"
	"strings"

	"github.com/outbox-relay/outbox-relay/internal/ident"
)

// queries holds every SQL statement of the relay, rendered once for the
// configured table. Statements take arrays (= ANY, unnest) so that a batch of
// any size is one statement.
type queries struct {
	claimBatch string
	// readPayloadPiece reads $3 bytes of row $1's payload from offset $2 (1-based).
	readPayloadPiece string
	probePending     string
	markDispatched   string
	deleteDispatched string
	recordFailures   string
	readStats        string
	releaseStats     string
	notifyTrigger    string

	cleanDispatched string
	cleanDead       string

	// Ordered mode (see ordering.go).
	claimOrdered      string
	readHorizon       string
	takeMemberSlot    string
	countMembers      string
	takePartitions    string
	releasePartitions string
}

// queryPartitionOwners groups the partition leases (advisory locks of the
// lease class) by the backend holding them.
const queryPartitionOwners = `SELECT l.pid, coalesce(a.application_name, ''), coalesce(host(a.client_addr), ''),
       coalesce(a.backend_start, now()), array_agg(l.objid::bigint::int4 ORDER BY l.objid)
FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND l.classid::bigint = $1::bigint
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
GROUP BY l.pid, a.application_name, a.client_addr, a.backend_start
ORDER BY l.pid`

// queryPartitionBacklog counts pending keyed rows per partition; format
// with the table and partitionOf(1).
const queryPartitionBacklog = `SELECT %[2]s AS p, count(*) FROM %[1]s
WHERE ` + pending + ` AND partition_key IS NOT NULL GROUP BY p`

// partitionOf is the SQL expression for a key's virtual partition, given
// the partition count as parameter $n.
func partitionOf(n int) string {
	return fmt.Sprintf(`((hashtextextended(partition_key, 0) & 2147483647) %% $%d)::int4`, n)
}

// messageColumns are the columns scanMessage reads, in its order.
const messageColumns = `seq, id, event_type, coalesce(partition_key, ''), payload, content_type,
       headers, coalesce(correlation_id, ''), created_at, attempts, coalesce(routing_key, ''), coalesce(exchange, '')`

// routingColumns counts the columns of migration 00003 (routing overrides)
// on table $1: 2 once it is applied.
const routingColumns = `SELECT count(*) FROM pg_attribute
WHERE attrelid = $1::regclass AND attname IN ('routing_key', 'exchange') AND NOT attisdropped`

// replaySelection restricts a replay to dispatched rows: $1 from seq, $2 to
// seq (0: none), $3 since, $4 until (NULL: none), $5 types (empty: all).
const replaySelection = `dispatched_at IS NOT NULL AND seq >= $1 AND ($2 = 0 OR seq <= $2)
  AND ($3::timestamptz IS NULL OR created_at >= $3) AND ($4::timestamptz IS NULL OR created_at < $4)
  AND (cardinality($5::text[]) = 0 OR event_type = ANY($5))`

// countReplay and pageReplay read a replay selection; the page is $6 rows.
func countReplay(tbl string) string {
	return fmt.Sprintf(`SELECT count(*) FROM %s WHERE `+replaySelection, tbl)
}

func pageReplay(tbl string) string {
	return fmt.Sprintf(`SELECT `+messageColumns+` FROM %s WHERE `+replaySelection+` ORDER BY seq LIMIT $6`, tbl)
}

// payloadPiece is the most payload bytes read in one row: larger payloads
// are read in pieces (Relay.readLargePayload).
const payloadPiece = 1 << 20

// claimedColumns is the select list of the claim queries that budgeted wraps:
// the whole row (messageColumns is applied to it afterwards) and the size of
// its payload. octet_length reads a TOASTed payload's size from its pointer,
// without detoasting it, and materializing the row keeps the pointer.
const claimedColumns = `*, octet_length(payload)::bigint AS claim_bytes`

// budgeted wraps a claim query, which locks the rows to claim and returns
// claimedColumns, with the byte budget. Of the locked rows, in seq order,
// it returns those whose payloads add up to at most $p bytes, or the first
// alone however large when $p+1 is true (nothing else is in flight), with
// the payload's size after messageColumns. A row over
// amqp.max_message_size ($p+2) is returned too, to be parked dead, and its
// payload, like any over payloadPiece, is left out (NULL). No row is
// modified here: a claim must not need more than a row lock.
//
// When all the locked rows fit, as they do but for large payloads, the
// running sum is never computed. Rows come in the order they were locked,
// seq order in practice; the relay sorts them if not (sorting whole rows
// here cost more than the rest of the wrapper). Locked rows past the
// budget stay locked until the batch settles; the next claim skips them.
func budgeted(tbl, claim string, p int) string {
	columns := strings.Replace(messageColumns, "payload,", fmt.Sprintf("CASE WHEN claim_bytes <= %d THEN payload END,", payloadPiece), 1)
	if columns == messageColumns {
		panic("relay: messageColumns has no payload column")
	}
	return fmt.Sprintf(`WITH locked AS MATERIALIZED (
%[1]s
), totals AS (
  SELECT coalesce(sum(claim_bytes), 0) <= $%[3]d::bigint AND coalesce(max(claim_bytes), 0) <= $%[5]d::bigint AS fit FROM locked
), fits AS (
  SELECT seq FROM (
    SELECT seq, claim_bytes, sum(claim_bytes) OVER (ORDER BY seq ROWS UNBOUNDED PRECEDING) AS upto
    FROM locked WHERE claim_bytes <= $%[5]d::bigint
  ) w WHERE upto <= $%[3]d::bigint OR (upto = claim_bytes AND $%[4]d::bool)
)
SELECT %[6]s, claim_bytes
FROM locked
WHERE (SELECT fit FROM totals) OR seq IN (SELECT seq FROM fits) OR claim_bytes > $%[5]d::bigint`, claim, tbl, p, p+1, p+2, columns)
}

// pending is the predicate of the partial index outbox_pending; every query
// that looks for work repeats it verbatim so the planner can use the index.
const pending = `dispatched_at IS NULL AND dead_at IS NULL`

func newQueries(t ident.Table, onDead string) queries {
	tbl := t.Quoted()
	// With on_dead: block, a dead row of a key stops the rows after it.
	deadBlocks := ""
	if onDead == OnDeadBlock {
		deadBlocks = fmt.Sprintf(` AND NOT EXISTS (SELECT 1 FROM %s d WHERE d.dead_at IS NOT NULL
             AND d.dispatched_at IS NULL AND d.partition_key = h.partition_key AND d.seq < h.seq)`, tbl)
	}
	return queries{
		// Heads only: per key in the owned partitions, the lowest pending
		// row, if it is due and at or below the commit horizon ($4). Rows
		// without a key are claimed as in unordered mode. SKIP LOCKED skips
		// a head another relay holds, and with it its whole key.
		claimOrdered: budgeted(tbl, fmt.Sprintf(`WITH heads AS (
  SELECT DISTINCT ON (partition_key) seq, partition_key, available_at
  FROM %[1]s
  WHERE `+pending+` AND partition_key IS NOT NULL AND %[3]s = ANY($3::int4[])
  ORDER BY partition_key, seq
)
SELECT `+claimedColumns+`
FROM %[1]s
WHERE `+pending+` AND available_at <= now()
  AND (partition_key IS NULL
       OR seq IN (SELECT h.seq FROM heads h WHERE h.seq <= $4 AND h.available_at <= now()%[2]s))
ORDER BY seq
LIMIT $1
FOR UPDATE SKIP LOCKED`, tbl, deadBlocks, partitionOf(2)), 5),

		// The sequence's last value L; if it passed $2, a fresh transaction
		// id taken after L was read (the subquery is a fence: the CASE
		// depends on its output); and the oldest running transaction that
		// holds a lock on the outbox table ($3), NULL when there is none.
		// Only such a transaction can have drawn a seq, so transactions
		// elsewhere in the cluster do not count. It is read after L (it
		// depends on s.l), which lets it vouch for L at once. pg_locks
		// shows 32-bit ids: each is widened to the 64-bit id nearest the
		// snapshot's xmax. As text: pgx has no xid8 type.
		readHorizon: `SELECT s.l,
       CASE WHEN s.l > $2::bigint THEN pg_current_xact_id()::text ELSE '' END,
       (SELECT min(w.x)::text FROM (
          SELECT bool_or(k.locktype = 'relation') AS writes,
                 min(r.x + d.d - CASE WHEN d.d >= 2147483648 THEN 4294967296 ELSE 0 END)
                   FILTER (WHERE k.locktype = 'transactionid') AS x
          FROM pg_locks k,
               (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS x) r,
               LATERAL (SELECT (k.transactionid::text::bigint - (r.x & 4294967295)) & 4294967295 AS d) d
          WHERE k.granted AND s.l IS NOT NULL
            AND ((k.locktype = 'relation' AND k.relation = $3::regclass)
                 OR (k.locktype = 'transactionid' AND k.mode = 'ExclusiveLock'))
          GROUP BY k.virtualtransaction) w
        WHERE w.writes)
FROM (SELECT coalesce(pg_sequence_last_value($1::regclass), 0) AS l OFFSET 0) s`,

		// Session advisory locks: (class, slot) marks a live replica,
		// (class, partition) a leased partition. CASE fixes the evaluation
		// order so a lock already held is never taken twice.
		takeMemberSlot: `SELECT s::int4 FROM generate_series(0, $2::int4 - 1) s WHERE pg_try_advisory_lock($1::int4, s) LIMIT 1`,
		countMembers: `SELECT count(*) FROM pg_locks
WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND classid::bigint = $1::bigint
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`,
		takePartitions: `SELECT p::int4 FROM generate_series(0, $2::int4 - 1) p
WHERE CASE WHEN p = ANY($3::int4[]) THEN false ELSE pg_try_advisory_lock($1::int4, p) END
LIMIT $4`,
		releasePartitions: `SELECT pg_advisory_unlock($1::int4, p) FROM unnest($2::int4[]) p`,

		// Due pending rows in sequence order; rows locked by another relay
		// are skipped, so replicas share the table without coordination.
		claimBatch: budgeted(tbl, fmt.Sprintf(`SELECT `+claimedColumns+`
FROM %s
WHERE `+pending+` AND available_at <= now()
ORDER BY seq
LIMIT $1
FOR UPDATE SKIP LOCKED`, tbl), 2),

		readPayloadPiece: fmt.Sprintf(`SELECT substring(payload FROM $2::int FOR $3::int) FROM %s WHERE seq = $1`, tbl),

		// One round trip, no locks, no transaction: is anything due?
		probePending: fmt.Sprintf(`SELECT EXISTS (SELECT 1 FROM %s WHERE `+pending+` AND available_at <= now())`, tbl),

		markDispatched:   fmt.Sprintf(`UPDATE %s SET dispatched_at = now() WHERE seq = ANY($1::bigint[])`, tbl),
		deleteDispatched: fmt.Sprintf(`DELETE FROM %s WHERE seq = ANY($1::bigint[])`, tbl),

		// Failed rows: charge the attempt, record the error, and either make
		// the row due again after its backoff or park it dead.
		recordFailures: fmt.Sprintf(`UPDATE %s AS o
SET attempts     = o.attempts + u.charge,
    last_error   = u.err,
    available_at = now() + u.delay_ms * interval '1 millisecond',
    dead_at      = CASE WHEN u.dead THEN now() END
FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::bool[], $5::int[]) AS u(seq, err, delay_ms, dead, charge)
WHERE o.seq = u.seq`, tbl),

		// Retention: one page of $2 rows along the primary key after seq $3,
		// deleting those dispatched before the cutoff. No index covers
		// dispatched_at (every mark would pay for it), so the cleaner walks
		// seq in bounded pages and stops at the first page that deleted
		// nothing and holds a row created after the cutoff: rows are
		// created in about seq order and none is dispatched before it is
		// created. A cutoff-free walk over the whole retained history at
		// every run is what this avoids. The transaction-level advisory
		// lock ($4) lets one replica's cleaner run at a time; the others
		// see an empty page. Returns deleted, the page's last seq, the
		// page's row count and whether it held a row newer than the cutoff.
		cleanDispatched: fmt.Sprintf(`WITH page AS (
  SELECT seq, created_at FROM %[1]s
  WHERE seq > $3 AND (SELECT pg_try_advisory_xact_lock($4::int4, 0))
  ORDER BY seq LIMIT $2
), gone AS (
  DELETE FROM %[1]s o USING page p
  WHERE o.seq = p.seq AND o.dispatched_at < now() - $1::bigint * interval '1 millisecond'
  RETURNING o.seq
)
SELECT (SELECT count(*) FROM gone), coalesce((SELECT max(seq) FROM page), 0), (SELECT count(*) FROM page),
       coalesce((SELECT bool_or(created_at >= now() - $1::bigint * interval '1 millisecond') FROM page), false)`, tbl),
		cleanDead: fmt.Sprintf(`DELETE FROM %[1]s WHERE seq IN (
  SELECT seq FROM %[1]s WHERE dead_at IS NOT NULL AND dead_at < now() - $1::bigint * interval '1 millisecond'
  LIMIT $2 FOR UPDATE SKIP LOCKED)`, tbl),

		// Takes or renews the stats lease ($1 owner, $2 lease in ms) and
		// counts only when it holds it: no lease row, no row out, and the
		// counts (uncorrelated subqueries) are never evaluated. The oldest
		// age looks at due rows only: a row delayed on purpose is not late.
		readStats: fmt.Sprintf(`WITH lease AS (
  INSERT INTO %[2]s AS l (id, owner, expires_at) VALUES (true, $1, now() + $2::bigint * interval '1 millisecond')
  ON CONFLICT (id) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at
    WHERE l.owner = excluded.owner OR l.expires_at < now()
  RETURNING 1)
SELECT
  (SELECT count(*) FROM %[1]s WHERE `+pending+`),
  (SELECT count(*) FROM %[1]s WHERE `+pending+` AND available_at > now()),
  (SELECT count(*) FROM %[1]s WHERE dead_at IS NOT NULL),
  coalesce(extract(epoch FROM now() - (SELECT created_at FROM %[1]s WHERE `+pending+` AND available_at <= now() ORDER BY seq LIMIT 1)), 0)::float8,
  extract(epoch FROM now())::float8
FROM lease`, tbl, t.Derived("stats_lease")),
		releaseStats: fmt.Sprintf(`DELETE FROM %s WHERE owner = $1`, t.Derived("stats_lease")),

		// Whether the NOTIFY trigger is enabled ('O' origin, 'A' always).
		notifyTrigger: `SELECT coalesce((SELECT tgenabled IN ('O', 'A') FROM pg_trigger
  WHERE tgrelid = $1::regclass AND tgname = $2), false)`,
	}
}

// beginWrite opens the relay's write transactions (writeTx): one simple-
// protocol round trip, the setting scoped to the transaction.
const beginWrite = `BEGIN; SET LOCAL synchronous_commit = off`

// backendPID names the server session a statement ran in.
const backendPID = `SELECT pg_backend_pid()`
