-- Access policies and tags (schema version 8), as in the SQLite schema (version 4).

ALTER TABLE workloads ADD COLUMN tags TEXT NOT NULL DEFAULT '[]';

CREATE TABLE policies (
    network     TEXT    NOT NULL REFERENCES networks (name),
    version     BIGINT  NOT NULL,
    source      TEXT,
    author      TEXT    NOT NULL,
    created_at  BIGINT  NOT NULL,
    restored    BIGINT,
    PRIMARY KEY (network, version)
);
