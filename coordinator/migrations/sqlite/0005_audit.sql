-- Admin tokens with roles, and the audit log (schema version 5).

-- Admin tokens besides the bootstrap one (which lives in the state directory). The secret is
-- kept as its SHA-256 only.
CREATE TABLE admin_tokens (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    name         TEXT    NOT NULL UNIQUE,
    secret_hash  TEXT    NOT NULL UNIQUE,
    -- 'read', 'operator' or 'admin'.
    role         TEXT    NOT NULL,
    -- The one network it may act on; NULL: every network.
    network      TEXT,
    created_at   INTEGER NOT NULL,
    -- Who made it (an actor as the audit log names it).
    created_by   TEXT    NOT NULL,
    revoked_at   INTEGER
);

-- Every admin action and every refused request, oldest first; pruned by age and count.
CREATE TABLE audit (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    at        INTEGER NOT NULL,
    -- Who: 'admin:bootstrap', 'admin:NAME' (an admin token), 'node:NAME' or 'unauthenticated'.
    actor     TEXT    NOT NULL,
    -- What: 'POST /v1/workloads/chat/move', 'claim chat', ...
    action    TEXT    NOT NULL,
    -- The network and node concerned, when known.
    network   TEXT,
    node      TEXT,
    -- The HTTP status (or 200 / 403 for node actions) and a one-line outcome.
    status    INTEGER NOT NULL,
    result    TEXT    NOT NULL,
    -- The client's address, when there is one.
    source    TEXT
);
CREATE INDEX audit_at ON audit (at);
