-- The consumer-side inbox: message ids a consumer has processed, recorded in
-- the same transaction as the consumer's own writes (package inbox).

-- +goose Up
CREATE TABLE {{.Table}} (
    consumer     text        NOT NULL DEFAULT '',
    message_id   text        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);

CREATE INDEX {{.Local "processed_at"}} ON {{.Table}} (processed_at);

-- +goose Down
DROP TABLE {{.Table}};
