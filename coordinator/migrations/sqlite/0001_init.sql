-- meshlink coordinator schema, version 1 (SQLite).
-- Times are Unix seconds. Secrets are stored only as hex SHA-256 hashes.
-- AUTOINCREMENT keeps ids from ever being reused, even after deletes.

CREATE TABLE networks (
    name        TEXT    PRIMARY KEY NOT NULL,
    cidr        TEXT    NOT NULL,
    -- The map version; only ever incremented.
    version     INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL
);

CREATE TABLE join_tokens (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    secret_hash  TEXT    NOT NULL UNIQUE,
    network      TEXT    NOT NULL REFERENCES networks (name),
    -- JSON array of strings.
    tags         TEXT    NOT NULL DEFAULT '[]',
    -- NULL: never expires.
    expires_at   INTEGER,
    -- NULL: unlimited.
    max_uses     INTEGER,
    used         INTEGER NOT NULL DEFAULT 0,
    revoked      INTEGER NOT NULL DEFAULT 0,
    created_at   INTEGER NOT NULL
);

CREATE TABLE nodes (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    network      TEXT    NOT NULL REFERENCES networks (name),
    name         TEXT    NOT NULL,
    -- Standard base64, as `wg pubkey` prints it.
    public_key   TEXT    NOT NULL,
    -- Dotted IPv4 overlay address.
    address      TEXT    NOT NULL,
    secret_hash  TEXT    NOT NULL,
    -- JSON object of strings.
    labels       TEXT    NOT NULL DEFAULT '{}',
    -- JSON array of strings.
    tags         TEXT    NOT NULL DEFAULT '[]',
    -- JSON array of "ip:port" strings reported by the agent.
    endpoints    TEXT    NOT NULL DEFAULT '[]',
    -- "ip:port" seen by the coordinator, NULL when none.
    observed     TEXT,
    revoked      INTEGER NOT NULL DEFAULT 0,
    created_at   INTEGER NOT NULL,
    last_seen    INTEGER,
    UNIQUE (network, name),
    UNIQUE (network, address),
    UNIQUE (network, public_key)
);

CREATE INDEX nodes_by_name ON nodes (name);
