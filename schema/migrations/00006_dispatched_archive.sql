-- Dispatched rows live in an archive table of their own, <table>_dispatched.
-- With relay.on_dispatch: mark the relay used to set dispatched_at in place.
-- That update can never be HOT (dispatched_at is in the predicate of the
-- partial indexes pending and pending_key), so each mark wrote a new row
-- version and new entries in the unique indexes on seq and id: about 8.6 µs
-- of database CPU per event. Moving the row in one statement (DELETE ...
-- RETURNING, INSERT) into a table without unique indexes costs about
-- 4.6 µs, and the outbox table keeps only pending and dead rows (and
-- the rows marked in place before this migration, until retention deletes
-- them).
--
-- The archive has the outbox's columns, in the same order, and no
-- constraint but NOT NULL: every row comes from the outbox, already checked.
-- A later migration that adds a column to the outbox table must add it here
-- too, and to outboxsql.Columns (internal/outboxsql), which the relay's move
-- lists; schema's TestArchiveColumns compares the three.

-- +goose Up
CREATE TABLE {{.Func "dispatched"}} (
    tx_id          xid8        NOT NULL,
    seq            bigint      NOT NULL,
    id             uuid        NOT NULL,
    event_type     text        NOT NULL,
    partition_key  text,
    payload        bytea       NOT NULL,
    content_type   text        NOT NULL,
    headers        jsonb       NOT NULL,
    correlation_id text,
    created_at     timestamptz NOT NULL,
    available_at   timestamptz NOT NULL,
    attempts       integer     NOT NULL,
    last_error     text,
    dispatched_at  timestamptz NOT NULL,
    dead_at        timestamptz,
    routing_key    text,
    exchange       text
);

-- Not unique, and no primary key: a unique check per moved row is the cost
-- this table removes. seq and id stay unique all the same, since a row
-- leaves the outbox in the statement that archives it. Replay pages by seq,
-- and so does retention (rows are dispatched in about seq order).
CREATE INDEX {{.Local "dispatched_seq"}} ON {{.Func "dispatched"}} (seq);

-- Rows arrive in about dispatched_at order, so a BRIN index (a few pages for
-- millions of rows) finds the recent ones for `outbox-relay status`, at
-- next to no cost per insert. Not the expired ones for retention: once
-- vacuum frees pages and new rows fill them, a range's minimum never rises
-- again, and every range would match an old cutoff.
CREATE INDEX {{.Local "dispatched_at"}} ON {{.Func "dispatched"}} USING brin (dispatched_at);

-- A logical-replication publication FOR ALL TABLES (wal_level = logical)
-- refuses UPDATE and DELETE on a table without a replica identity, and the
-- archive has no primary key: without this, every retention DELETE would
-- fail there. FULL logs the whole old row of each deleted row; it changes
-- nothing without logical decoding.
ALTER TABLE {{.Func "dispatched"}} REPLICA IDENTITY FULL;

-- The rows dispatched before this migration stay where they are: moving
-- the whole retained history in this transaction would take time in
-- proportion to it (past the migrate Job's deadline on a large table), and
-- ordered-mode relays, whose commit horizon waits for transactions writing
-- the outbox table, would stall meanwhile. They age out of the outbox
-- table through the retention cleaner (cleanDispatched), and replay reads
-- them there too.

-- +goose Down
-- The archived rows go back into the outbox table, dispatched, with their
-- own seq (an identity column, hence OVERRIDING SYSTEM VALUE).
WITH m AS (
    DELETE FROM {{.Func "dispatched"}}
    RETURNING tx_id, seq, id, event_type, partition_key, payload, content_type, headers, correlation_id,
              created_at, available_at, attempts, last_error, dispatched_at, dead_at, routing_key, exchange
)
INSERT INTO {{.Table}} (tx_id, seq, id, event_type, partition_key, payload, content_type, headers, correlation_id,
                        created_at, available_at, attempts, last_error, dispatched_at, dead_at, routing_key, exchange)
OVERRIDING SYSTEM VALUE
SELECT tx_id, seq, id, event_type, partition_key, payload, content_type, headers, correlation_id,
       created_at, available_at, attempts, last_error, dispatched_at, dead_at, routing_key, exchange
FROM m;

DROP TABLE {{.Func "dispatched"}};
