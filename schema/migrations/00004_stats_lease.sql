-- The lease that lets one relay at a time count the whole table for the
-- backlog gauges: every replica would report the same numbers, and alerts
-- on them would fire once per replica. A lease (not an advisory lock) lapses
-- when its holder freezes, and works through PgBouncer in transaction mode.

-- +goose Up
CREATE TABLE {{.Func "stats_lease"}} (
    id         bool        PRIMARY KEY DEFAULT true CHECK (id),
    owner      text        NOT NULL,
    expires_at timestamptz NOT NULL
);

-- +goose Down
DROP TABLE {{.Func "stats_lease"}};
