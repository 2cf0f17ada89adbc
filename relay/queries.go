package relay

import (
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/outbox-relay/outbox-relay/internal/ident"
	"github.com/outbox-relay/outbox-relay/internal/outboxsql"
)

// queries holds every SQL statement of the relay, rendered once for the
// configured table. Statements take arrays (= ANY, unnest) so that a batch of
// any size is one statement.
type queries struct {
	claimBatch string
	// readPayloads reads whole payloads the claim left out.
	readPayloads string
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
	cleanArchived   string
	cleanDead       string

	// Ordered mode (see ordering.go).
	findHeads         string
	claimOrdered      string
	confirmHeads      string
	readHorizon       string
	renewLeases       string
	takePartitions    string
	releasePartitions string
	releaseAll        string
}

// partitionOf is the SQL expression for a key's virtual partition, given
// the partition count as parameter $n.
func partitionOf(n int) string { return partitionOfKey("partition_key", n) }

// partitionOfKey is partitionOf for the key in column col.
func partitionOfKey(col string, n int) string { return outboxsql.PartitionOf(col, n) }

// deadOwners is a CTE "dead" of the replicas that registered a token ($5:
// its advisory lock class, keyed by hashtext(owner)) and no longer hold it:
// their process has died. Format with the relays table as %[2]s.
const deadOwners = `held AS MATERIALIZED (
  SELECT objid::bigint AS k FROM pg_locks
  WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND classid::bigint = $5::bigint
    AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
), dead AS MATERIALIZED (
  SELECT owner FROM %[2]s WHERE token AND (hashtext(owner)::bigint & 4294967295) NOT IN (SELECT k FROM held)
)`

// messageColumns are the columns scanMessage reads, in its order.
const messageColumns = MessageColumns

// MessageColumns is the select list ScanMessage reads, for packages that
// read rows to publish them again (internal/ops: replay).
const MessageColumns = `seq, id, event_type, coalesce(partition_key, ''), payload, content_type,
       headers, coalesce(correlation_id, ''), created_at, attempts, coalesce(routing_key, ''), coalesce(exchange, '')`

// ScanMessage reads one row of MessageColumns into a message as the engine
// does (scanMessage), for packages that publish rows again (internal/ops:
// replay), so that a copy carries what the first publish did.
func ScanMessage(rows pgx.Rows) (Message, error) { return scanMessage(rows) }

// routingColumns counts the columns of migration 00003 (routing overrides)
// on table $1: 2 once it is applied.
const routingColumns = `SELECT count(*) FROM pg_attribute
WHERE attrelid = $1::regclass AND attname IN ('routing_key', 'exchange') AND NOT attisdropped`

// archivedColumns are the columns a mark carries from the outbox table to
// the archive: all but dispatched_at, which the move sets.
func archivedColumns() string {
	cols := strings.Replace(outboxsql.Columns, " dispatched_at,", "", 1)
	if cols == outboxsql.Columns {
		panic("relay: outboxsql.Columns has no dispatched_at column")
	}
	return cols
}

// tableExists is whether table $1 exists: the outbox table, or the
// archive of migration 00006.
const tableExists = `SELECT to_regclass($1) IS NOT NULL`

// tablePrivileges is whether this role may select, update (claims lock
// rows FOR UPDATE, failures are recorded) and delete from table $1, and
// insert into the archive $2, as settling a batch with mark does. One call
// per privilege: has_table_privilege with a list is true if any is held.
const tablePrivileges = `SELECT has_table_privilege($1, 'SELECT'), has_table_privilege($1, 'UPDATE'),
       has_table_privilege($1, 'DELETE'), has_table_privilege($2, 'INSERT')`

// payloadPiece is the most payload bytes read in one row: larger payloads
// are read in pieces (Relay.readLargePayload).
const payloadPiece = 1 << 20

// claimColumns is the select list of the claim queries: messageColumns
// with the payload only when it is at most $p bytes (NULL otherwise; the
// relay reads it afterwards if it fits the byte budget), then the row's
// ctid and the payload's size. octet_length reads a TOASTed payload's size
// from its pointer, without detoasting it.
//
// Settling finds the rows by ctid (a TID scan), not seq (a descent of the
// primary key per row): 1–3 µs less per row of the database's CPU
// (docs/benchmarks.md, "Marking by ctid"). The claim's transaction holds
// the rows locked FOR UPDATE until it settles them in the same
// transaction, so their ctid cannot change meanwhile: only an update moves
// a row, and VACUUM FULL or CLUSTER wait for the transaction's lock on the
// table. Settling checks the seqs it marked all the same (record).
func claimColumns(p int) string {
	columns := strings.Replace(messageColumns, "payload,", fmt.Sprintf("CASE WHEN octet_length(payload) <= $%d THEN payload END,", p), 1)
	if columns == messageColumns {
		panic("relay: messageColumns has no payload column")
	}
	return columns + ", ctid, octet_length(payload)::bigint"
}

// pending is the predicate of the partial indexes pending and pending_key;
// every query that looks for work repeats it so the planner can use them.
const pending = outboxsql.Pending

// pendingAlias is pending for a table aliased e.
var pendingAlias = outboxsql.Qualified("e", pending)

func newQueries(t ident.Table, onDead string) queries {
	tbl, archive := t.Quoted(), outboxsql.Archive(t)
	leasesTbl, relaysTbl := t.Derived("leases"), t.Derived("relays")
	// With on_dead: block, a dead row of a key stops the rows after it.
	deadBlocks := ""
	if onDead == OnDeadBlock {
		deadBlocks = fmt.Sprintf(` AND NOT EXISTS (SELECT 1 FROM %s d WHERE `+outboxsql.Qualified("d", outboxsql.Dead)+`
             AND d.dispatched_at IS NULL AND d.partition_key = o.partition_key AND d.seq < o.seq)`, tbl)
	}
	return queries{
		// The heads of up to $2 keys from key $1 on, in key order (walked:
		// true), and of the keys $5 (false) past their rows $6 just
		// dispatched: per key its lowest pending row, one probe of
		// pending_key each (the walk is a loose index scan), so the cost
		// follows the keys visited, never the rows queued behind them; the
		// probe past a dispatched row also skips the index entries its
		// key's dispatched rows leave until vacuum. Each comes with whether
		// it can be claimed now: due, and in a partition of $3 (this
		// replica's, as it last renewed them; claimOrdered checks the lease
		// table itself).
		findHeads: fmt.Sprintf(`WITH RECURSIVE walk AS (
  (SELECT e.partition_key AS k, e.seq, e.available_at, 1 AS n FROM %[1]s e
   WHERE `+pendingAlias+` AND e.partition_key >= $1 ORDER BY e.partition_key, e.seq LIMIT 1)
  UNION ALL
  SELECT nx.k, nx.seq, nx.available_at, w.n + 1 FROM walk w, LATERAL (
    SELECT e.partition_key AS k, e.seq, e.available_at FROM %[1]s e
    WHERE `+pendingAlias+` AND e.partition_key > w.k ORDER BY e.partition_key, e.seq LIMIT 1) nx
  WHERE w.n < $2
)
SELECT true, k, 0::bigint, seq, available_at <= now() AND %[2]s = ANY($3::int4[]) FROM walk
UNION ALL
SELECT false, k, t.after, h.seq, h.available_at <= now() AND %[2]s = ANY($3::int4[])
FROM unnest($5::text[], $6::bigint[]) t(k, after), LATERAL (
  SELECT e.seq, e.available_at FROM %[1]s e WHERE `+pendingAlias+` AND e.partition_key = t.k AND e.seq > t.after
  ORDER BY e.seq LIMIT 1) h`, tbl, partitionOfKey("k", 4)),

		// Claims the heads $6 found by findHeads, and due keyless rows as in
		// unordered mode (through pending_key, where they sort first), in
		// seq order. A head is taken only while its partition's lease is
		// this replica's ($3) for at least $5 ms more, so a replica that
		// lost it claims nothing of it. SKIP LOCKED skips a head another
		// batch holds (its key's later rows are never heads meanwhile); a
		// head settled since findHeads no longer matches pending. The
		// commit horizon is checked afterwards (gate). The transaction may
		// stay idle for at most $4 (ms): if this replica freezes, the
		// server ends it and frees its rows. $7: the most payload bytes
		// returned in a row (claimColumns).
		claimOrdered: fmt.Sprintf(`WITH fence AS MATERIALIZED (
  SELECT set_config('idle_in_transaction_session_timeout', $4::text, true) IS NOT NULL AS ok
), owned AS (
  SELECT coalesce(array_agg(l.partition), '{}') AS p FROM %[4]s l
  WHERE l.owner = $3 AND l.expires_at > now() + $5::bigint * interval '1 millisecond'
)
SELECT `+claimColumns(7)+`
FROM %[1]s o
WHERE (SELECT ok FROM fence)
  AND o.seq = ANY(ARRAY(SELECT e.seq FROM %[1]s e WHERE `+pendingAlias+` AND e.partition_key IS NULL
                          AND e.available_at <= now() ORDER BY e.partition_key, e.seq LIMIT 4 * $1) || $6::bigint[])
  AND `+pending+` AND available_at <= now()
  AND (partition_key IS NULL OR (%[3]s = ANY((SELECT p FROM owned)::int4[])%[2]s))
ORDER BY seq
LIMIT $1
FOR UPDATE SKIP LOCKED`, tbl, deadBlocks, partitionOf(2), leasesTbl),

		// Of the claimed rows $1, those still their key's lowest pending
		// row, seen by a statement that starts after the horizon was read.
		confirmHeads: fmt.Sprintf(`SELECT o.seq FROM %[1]s o
WHERE o.seq = ANY($1::bigint[])
  AND NOT EXISTS (SELECT 1 FROM %[1]s e WHERE e.partition_key = o.partition_key AND e.seq < o.seq
                    AND `+pendingAlias+`)%[2]s`, tbl, deadBlocks),

		// The sequence's last value L; if it passed $2, a fresh transaction
		// id taken after L was read (the subquery is a fence: the CASE
		// depends on its output); and the oldest running transaction that
		// holds ROW EXCLUSIVE on the outbox table ($3) in this database,
		// NULL when there is none. Every insert takes that mode and holds
		// it to the end; readers, ANALYZE and FOR UPDATE claims take others,
		// and other databases have tables of the same OID (clones of one
		// template), so only these count. It is read after L (it depends on
		// s.l), which lets it vouch for L at once. pg_locks shows 32-bit
		// ids: each is widened to the 64-bit id nearest the snapshot's xmax.
		// As text: pgx has no xid8 type. Last, the server's start time: a
		// new one means a restart or failover, and the horizon starts over.
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
            AND ((k.locktype = 'relation' AND k.relation = $3::regclass AND k.mode = 'RowExclusiveLock'
                  AND k.database = (SELECT oid FROM pg_database WHERE datname = current_database()))
                 OR (k.locktype = 'transactionid' AND k.mode = 'ExclusiveLock'))
          GROUP BY k.virtualtransaction) w
        WHERE w.writes),
       pg_postmaster_start_time()
FROM (SELECT coalesce(pg_sequence_last_value($1::regclass), 0) AS l OFFSET 0) s`,

		// Leases ($1 owner, $2 timeout in ms, $3 partitions, $4 whether this
		// replica holds its token, $5 the token lock class): register or
		// renew this replica, forget replicas gone for an hour, renew the
		// leases still held, and count the live replicas. A replica whose
		// token (a session advisory lock on a connection of its own) is
		// gone has died: its leases are free before they expire.
		renewLeases: fmt.Sprintf(`WITH `+deadOwners+`, me AS (
  INSERT INTO %[2]s AS r (owner, pid, application_name, client_addr, token, expires_at)
  VALUES ($1, pg_backend_pid(), current_setting('application_name'), coalesce(host(inet_client_addr()), ''),
          $4::bool, now() + $2::bigint * interval '1 millisecond')
  ON CONFLICT (owner) DO UPDATE SET token = excluded.token, expires_at = excluded.expires_at
), gone AS (
  DELETE FROM %[2]s WHERE expires_at < now() - interval '1 hour'
), mine AS (
  UPDATE %[1]s SET expires_at = now() + $2::bigint * interval '1 millisecond'
  WHERE owner = $1 AND expires_at > now() AND partition < $3::int4
  RETURNING partition
)
SELECT 1 + (SELECT count(*) FROM %[2]s WHERE expires_at > now() AND owner <> $1
              AND owner NOT IN (SELECT owner FROM dead))::int,
       coalesce((SELECT array_agg(partition ORDER BY partition) FROM mine), '{}'::int4[])`, leasesTbl, relaysTbl),
		// Up to $4 partitions nobody holds a live lease on ($5: the token
		// lock class). ON CONFLICT re-checks a row another replica took
		// meanwhile.
		takePartitions: fmt.Sprintf(`WITH `+deadOwners+`, free AS (
  SELECT p::int4 FROM generate_series(0, $3::int4 - 1) p
  WHERE NOT EXISTS (SELECT 1 FROM %[1]s l WHERE l.partition = p AND l.expires_at > now()
                      AND l.owner NOT IN (SELECT owner FROM dead))
  ORDER BY p LIMIT $4
)
INSERT INTO %[1]s AS l (partition, owner, expires_at)
SELECT p, $1, now() + $2::bigint * interval '1 millisecond' FROM free
ON CONFLICT (partition) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at
WHERE l.expires_at <= now() OR l.owner IN (SELECT owner FROM dead)
RETURNING partition`, leasesTbl, relaysTbl),
		releasePartitions: fmt.Sprintf(`DELETE FROM %s WHERE owner = $1 AND partition = ANY($2::int4[])`, leasesTbl),
		releaseAll:        fmt.Sprintf(`WITH l AS (DELETE FROM %s WHERE owner = $1) DELETE FROM %s WHERE owner = $1`, leasesTbl, relaysTbl),

		// Due pending rows in sequence order, above the claim floor $2
		// (floor.go), payloads up to $3 bytes (claimColumns); rows locked
		// by another relay are skipped, so replicas share the table
		// without coordination.
		claimBatch: fmt.Sprintf(`SELECT `+claimColumns(3)+`
FROM %s
WHERE `+pending+` AND available_at <= now() AND seq > $2
ORDER BY seq
LIMIT $1
FOR UPDATE SKIP LOCKED`, tbl),

		readPayloads:     fmt.Sprintf(`SELECT seq, payload FROM %s WHERE seq = ANY($1::bigint[])`, tbl),
		readPayloadPiece: fmt.Sprintf(`SELECT substring(payload FROM $2::int FOR $3::int) FROM %s WHERE seq = $1`, tbl),

		// One round trip, no locks, no transaction: is anything due?
		probePending: fmt.Sprintf(`SELECT EXISTS (SELECT 1 FROM %s WHERE `+pending+` AND available_at <= now())`, tbl),

		// Marking moves the rows to the archive (migration 00006): an
		// update of dispatched_at in place is never HOT and writes entries
		// in every index, where the archive has no unique index to check.
		// Both take the rows' ctids, as their claim locked them
		// (claimColumns), and return the seqs they settled (from the
		// outbox: the relay may insert into the archive, not read it).
		markDispatched: fmt.Sprintf(`WITH d AS (
  DELETE FROM %[1]s WHERE ctid = ANY($1::tid[])
  RETURNING %[3]s
), a AS (
  INSERT INTO %[2]s (%[3]s, dispatched_at)
  SELECT %[3]s, now() FROM d
)
SELECT seq FROM d`, tbl, archive, archivedColumns()),
		deleteDispatched: fmt.Sprintf(`DELETE FROM %s WHERE ctid = ANY($1::tid[]) RETURNING seq`, tbl),

		// Failed rows: charge the attempt, record the error, and either make
		// the row due again after its backoff or park it dead.
		recordFailures: fmt.Sprintf(`UPDATE %s AS o
SET attempts     = o.attempts + u.charge,
    last_error   = u.err,
    available_at = now() + u.delay_ms * interval '1 millisecond',
    dead_at      = CASE WHEN u.dead THEN now() END
FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::bool[], $5::int[]) AS u(seq, err, delay_ms, dead, charge)
WHERE o.seq = u.seq`, tbl),

		// Retention of the dispatched rows an older relay marked in place,
		// before migration 00006 or during a rolling upgrade to it: one
		// page of $2 rows along the primary key after seq $3,
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
		// Retention of the archive, paged like cleanDispatched: one page
		// of $2 rows along the index on seq after seq $3, deleting those
		// dispatched before the cutoff (by ctid: a TID scan). The walk
		// stops at the first page that deleted nothing and holds a row
		// created after the cutoff: rows are created in about seq order
		// and none is dispatched before it is created. The stop looks at
		// created_at, not dispatched_at, so a run of old rows dispatched
		// late (retried dead rows) does not stop it before the expired
		// rows after them. Not the BRIN index on dispatched_at: once
		// vacuum frees pages and new rows fill them, a range's minimum
		// never rises again, and every range matches the cutoff. The same
		// advisory lock ($4) as cleanDispatched: one replica at a time.
		// Returns what cleanDispatched does.
		cleanArchived: fmt.Sprintf(`WITH page AS (
  SELECT ctid, seq, created_at, dispatched_at FROM %[1]s
  WHERE seq > $3 AND (SELECT pg_try_advisory_xact_lock($4::int4, 0))
  ORDER BY seq LIMIT $2
), gone AS (
  DELETE FROM %[1]s WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM page WHERE dispatched_at < now() - $1::bigint * interval '1 millisecond'))
  RETURNING seq
)
SELECT (SELECT count(*) FROM gone), coalesce((SELECT max(seq) FROM page), 0), (SELECT count(*) FROM page),
       coalesce((SELECT bool_or(created_at >= now() - $1::bigint * interval '1 millisecond') FROM page), false)`, archive),
		cleanDead: fmt.Sprintf(`DELETE FROM %[1]s WHERE seq IN (
  SELECT seq FROM %[1]s WHERE `+outboxsql.Dead+` AND dead_at < now() - $1::bigint * interval '1 millisecond'
  LIMIT $2 FOR UPDATE SKIP LOCKED)`, tbl),

		// Takes or renews the stats lease ($1 owner, $2 lease in ms) and
		// counts only when it holds it: no lease row, no row out, and the
		// counts (uncorrelated subqueries) are never evaluated. Pending
		// and delayed rows are counted in one pass over the pending rows
		// (an array of the two): counted apart, the delayed count read
		// every pending row a second time. The oldest age looks at due
		// rows only: a row delayed on purpose is not late.
		readStats: fmt.Sprintf(`WITH lease AS (
  INSERT INTO %[2]s AS l (id, owner, expires_at) VALUES (true, $1, now() + $2::bigint * interval '1 millisecond')
  ON CONFLICT (id) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at
    WHERE l.owner = excluded.owner OR l.expires_at < now()
  RETURNING 1)
SELECT
  (SELECT ARRAY[count(*), count(*) FILTER (WHERE available_at > now())] FROM %[1]s WHERE `+pending+`),
  (SELECT count(*) FROM %[1]s WHERE `+outboxsql.Dead+`),
  coalesce(extract(epoch FROM now() - (SELECT created_at FROM %[1]s WHERE `+pending+` AND available_at <= now() ORDER BY seq LIMIT 1)), 0)::float8,
  extract(epoch FROM now())::float8
FROM lease`, tbl, t.Derived("stats_lease")),
		releaseStats: fmt.Sprintf(`DELETE FROM %s WHERE owner = $1`, t.Derived("stats_lease")),

		// Whether the NOTIFY trigger is enabled; a missing one is not.
		notifyTrigger: `SELECT coalesce((` + outboxsql.NotifyEnabled + `), false)`,
	}
}

// beginWrite opens the relay's write transactions (writeTx): one simple-
// protocol round trip, the setting scoped to the transaction.
const beginWrite = `BEGIN; SET LOCAL synchronous_commit = off`

// backendPID names the server session a statement ran in.
const backendPID = `SELECT pg_backend_pid()`
