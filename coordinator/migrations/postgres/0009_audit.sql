-- Admin tokens with roles, and the audit log (schema version 9), as in the SQLite schema
-- (version 5).

CREATE TABLE admin_tokens (
    id           BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name         TEXT    NOT NULL,
    secret_hash  TEXT    NOT NULL,
    role         TEXT    NOT NULL,
    network      TEXT,
    created_at   BIGINT  NOT NULL,
    created_by   TEXT    NOT NULL,
    revoked_at   BIGINT,
    CONSTRAINT "admin_tokens.name" UNIQUE (name),
    CONSTRAINT "admin_tokens.secret_hash" UNIQUE (secret_hash)
);

CREATE TABLE audit (
    id        BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at        BIGINT  NOT NULL,
    actor     TEXT    NOT NULL,
    action    TEXT    NOT NULL,
    network   TEXT,
    node      TEXT,
    status    BIGINT  NOT NULL,
    result    TEXT    NOT NULL,
    source    TEXT
);
CREATE INDEX audit_at ON audit (at);
