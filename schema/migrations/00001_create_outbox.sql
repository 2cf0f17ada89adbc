-- The outbox table. Every name below is rendered from the configured schema and
-- table (validated, then quoted), so one database can hold several outboxes.

-- +goose Up
-- +goose StatementBegin
-- UUID version 7 (RFC 9562): 48-bit millisecond timestamp, version and variant
-- bits, random rest. PostgreSQL 18 has uuidv7(); this works from 13 on.
CREATE FUNCTION {{.Func "uuid_v7"}}() RETURNS uuid
LANGUAGE sql VOLATILE PARALLEL SAFE AS $$
  SELECT encode(
    set_bit(set_bit(
      overlay(uuid_send(gen_random_uuid())
              placing substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
              FROM 1 FOR 6),
      52, 1), 53, 1),
    'hex')::uuid
$$;
-- +goose StatementEnd

CREATE TABLE {{.Table}} (
    -- The writing transaction. It is the first column on purpose: defaults
    -- are evaluated in column order, so the transaction has its id before
    -- it draws seq. The ordered relay relies on that to know when every
    -- lower seq has committed or aborted (see relay/ordering.go).
    tx_id          xid8        NOT NULL DEFAULT pg_current_xact_id(),
    seq            bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id             uuid        NOT NULL DEFAULT {{.Func "uuid_v7"}}(),
    event_type     text        NOT NULL CHECK (event_type <> '' AND octet_length(event_type) <= 255),
    partition_key  text,
    payload        bytea       NOT NULL,
    content_type   text        NOT NULL DEFAULT 'application/json',
    headers        jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(headers) = 'object'),
    correlation_id text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    available_at   timestamptz NOT NULL DEFAULT now(),
    attempts       integer     NOT NULL DEFAULT 0,
    last_error     text,
    dispatched_at  timestamptz,
    dead_at        timestamptz
);

CREATE UNIQUE INDEX {{.Local "id_key"}} ON {{.Table}} (id);

-- Only pending rows: the claim query's cost does not grow with the dispatched
-- history, and dispatched rows leave the index.
CREATE INDEX {{.Local "pending"}} ON {{.Table}} (seq)
    WHERE dispatched_at IS NULL AND dead_at IS NULL;

-- Dead rows are few; this keeps counting and listing them cheap.
CREATE INDEX {{.Local "dead"}} ON {{.Table}} (dead_at)
    WHERE dead_at IS NOT NULL;

-- +goose StatementBegin
CREATE FUNCTION {{.Func "notify"}}() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify({{.ChannelLiteral}}, '');
  RETURN NULL;
END
$$;
-- +goose StatementEnd

-- One NOTIFY per inserting statement, not per row. It is created disabled:
-- NOTIFY serialises committing transactions on a database-wide lock, which
-- costs producers far more than the relay's adaptive poll. `outbox-relay
-- notify enable` switches it on for wake.mode: notify.
CREATE TRIGGER {{.Local "notify"}} AFTER INSERT ON {{.Table}}
    FOR EACH STATEMENT EXECUTE FUNCTION {{.Func "notify"}}();
ALTER TABLE {{.Table}} DISABLE TRIGGER {{.Local "notify"}};

-- +goose Down
DROP TABLE {{.Table}};
DROP FUNCTION {{.Func "notify"}}();
DROP FUNCTION {{.Func "uuid_v7"}}();
