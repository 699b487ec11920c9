-- Access policies and tags (schema version 4).

-- Workloads carry tags, as nodes do: a JSON array of names that policies select by.
ALTER TABLE workloads ADD COLUMN tags TEXT NOT NULL DEFAULT '[]';

-- Every version of every network's policy, never rewritten: the latest row is in force.
-- A rollback is a new row with an older row's source; a row whose source is NULL says the
-- network has no policy from that version on (open).
CREATE TABLE policies (
    network     TEXT    NOT NULL REFERENCES networks (name),
    version     INTEGER NOT NULL,
    source      TEXT,
    -- Who set it (the admin token's name) and when.
    author      TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    -- The version this one restored, for a rollback.
    restored    INTEGER,
    PRIMARY KEY (network, version)
);
