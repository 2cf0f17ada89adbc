-- Ordered mode (relay.ordering: partition_key): partition leases with an
-- expiry, and an index that lets a claim find a key's lowest pending row at
-- the cost of one probe per candidate row. See docs/ordering.md.

-- +goose Up
-- Per key, pending rows in seq order: a key's head is one probe, and the
-- heads of many keys a walk from key to key that never reads the rows queued
-- behind them; keyless rows sort together, in seq order. A dispatched or
-- dead row leaves it, so it stays as small as the backlog.
CREATE INDEX {{.Local "pending_key"}} ON {{.Table}} (partition_key, seq)
    WHERE dispatched_at IS NULL AND dead_at IS NULL;

-- One row per leased partition. A lease lapses at expires_at unless its
-- holder's claim loop renews it, so a replica that hangs or freezes loses
-- its partitions; a session advisory lock would be held as long as the
-- frozen process's connection stays up.
CREATE TABLE {{.Func "leases"}} (
    partition  int4        PRIMARY KEY,
    owner      text        NOT NULL,
    expires_at timestamptz NOT NULL
);

-- The replicas, each renewing its row with its leases: the live ones split
-- the partitions between them. token: the replica holds a session advisory
-- lock on a connection of its own while it lives, so its leases are free as
-- soon as it dies, not only when they expire (not behind a pooler in
-- transaction mode, which keeps no session).
CREATE TABLE {{.Func "relays"}} (
    owner            text        PRIMARY KEY,
    pid              int4        NOT NULL,
    application_name text        NOT NULL,
    client_addr      text        NOT NULL,
    token            bool        NOT NULL DEFAULT false,
    since            timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL
);

-- +goose Down
DROP TABLE {{.Func "relays"}};
DROP TABLE {{.Func "leases"}};
DROP INDEX {{.Func "pending_key"}};
