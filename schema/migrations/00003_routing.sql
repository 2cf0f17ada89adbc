-- Per-row routing overrides: a row may name its own routing key and exchange
-- instead of event_type and amqp.exchange (NULL keeps the default). The relay
-- publishes only to exchanges listed in amqp.exchanges; a row naming another
-- is parked dead with the reason.

-- +goose Up
-- The columns are nullable without a default, so adding them does not rewrite
-- the table. The checks are NOT VALID: every existing row is NULL there, and
-- validating would scan the whole table while holding the lock that blocks
-- producers. New and updated rows are checked all the same.
ALTER TABLE {{.Table}}
    ADD COLUMN routing_key text,
    ADD COLUMN exchange    text,
    ADD CONSTRAINT {{.Local "routing_key_check"}}
        CHECK (routing_key <> '' AND octet_length(routing_key) <= 255) NOT VALID,
    ADD CONSTRAINT {{.Local "exchange_check"}}
        CHECK (exchange <> '' AND octet_length(exchange) <= 255) NOT VALID;

-- +goose Down
ALTER TABLE {{.Table}} DROP COLUMN exchange, DROP COLUMN routing_key;
