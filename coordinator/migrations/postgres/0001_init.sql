-- meshlink coordinator schema, version 1 (PostgreSQL): the same tables, columns and rules as
-- the SQLite schema of the same version, so that one set of queries serves both. Times are
-- Unix seconds; flags are 0/1 integers; lists and maps are JSON text. Identity columns are
-- never reused. Unique constraints carry the names SQLite reports ("table.column, ..."), so
-- that conflicts read the same on both.

CREATE TABLE networks (
    name        TEXT    PRIMARY KEY NOT NULL,
    cidr        TEXT    NOT NULL,
    version     BIGINT  NOT NULL DEFAULT 0,
    created_at  BIGINT  NOT NULL
);

CREATE TABLE join_tokens (
    id           BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    secret_hash  TEXT    NOT NULL,
    network      TEXT    NOT NULL REFERENCES networks (name),
    tags         TEXT    NOT NULL DEFAULT '[]',
    expires_at   BIGINT,
    max_uses     BIGINT,
    used         BIGINT  NOT NULL DEFAULT 0,
    revoked      BIGINT  NOT NULL DEFAULT 0,
    created_at   BIGINT  NOT NULL,
    CONSTRAINT "join_tokens.secret_hash" UNIQUE (secret_hash)
);

CREATE TABLE nodes (
    id           BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    network      TEXT    NOT NULL REFERENCES networks (name),
    name         TEXT    NOT NULL,
    public_key   TEXT    NOT NULL,
    address      TEXT    NOT NULL,
    secret_hash  TEXT    NOT NULL,
    labels       TEXT    NOT NULL DEFAULT '{}',
    tags         TEXT    NOT NULL DEFAULT '[]',
    endpoints    TEXT    NOT NULL DEFAULT '[]',
    observed     TEXT,
    revoked      BIGINT  NOT NULL DEFAULT 0,
    created_at   BIGINT  NOT NULL,
    last_seen    BIGINT,
    CONSTRAINT "nodes.network, nodes.name" UNIQUE (network, name),
    CONSTRAINT "nodes.network, nodes.address" UNIQUE (network, address),
    CONSTRAINT "nodes.network, nodes.public_key" UNIQUE (network, public_key)
);

CREATE INDEX nodes_by_name ON nodes (name);
