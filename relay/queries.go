package relay

import (
	"fmt"

	"github.com/outbox-relay/outbox-relay/internal/ident"
)

// queries holds every SQL statement of the relay, rendered once for the
// configured table. Statements take arrays (= ANY, unnest) so that a batch of
// any size is one statement.
type queries struct {
	claimBatch       string
	probePending     string
	markDispatched   string
	deleteDispatched string
	recordFailures   string
	readStats        string
	notifyTrigger    string
}

// pending is the predicate of the partial index outbox_pending; every query
// that looks for work repeats it verbatim so the planner can use the index.
const pending = `dispatched_at IS NULL AND dead_at IS NULL`

func newQueries(t ident.Table) queries {
	tbl := t.Quoted()
	return queries{
		// Due pending rows in sequence order; rows locked by another relay
		// are skipped, so replicas share the table without coordination.
		claimBatch: fmt.Sprintf(`SELECT seq, id, event_type, coalesce(partition_key, ''), payload, content_type,
       headers, coalesce(correlation_id, ''), created_at, attempts
FROM %s
WHERE `+pending+` AND available_at <= now()
ORDER BY seq
LIMIT $1
FOR UPDATE SKIP LOCKED`, tbl),

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

		readStats: fmt.Sprintf(`SELECT
  (SELECT count(*) FROM %[1]s WHERE `+pending+`),
  (SELECT count(*) FROM %[1]s WHERE dead_at IS NOT NULL),
  coalesce(extract(epoch FROM now() - (SELECT created_at FROM %[1]s WHERE `+pending+` ORDER BY seq LIMIT 1)), 0)::float8`, tbl),

		// Whether the NOTIFY trigger is enabled ('O' origin, 'A' always).
		notifyTrigger: `SELECT coalesce((SELECT tgenabled IN ('O', 'A') FROM pg_trigger
  WHERE tgrelid = $1::regclass AND tgname = $2), false)`,
	}
}
