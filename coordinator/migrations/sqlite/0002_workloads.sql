-- Workload addresses (schema version 2): an overlay address that belongs to a workload and is
-- held by at most one node at a time.

CREATE TABLE workloads (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    network      TEXT    NOT NULL REFERENCES networks (name),
    name         TEXT    NOT NULL,
    -- Dotted IPv4 overlay address, from the network's prefix.
    address      TEXT    NOT NULL,
    -- The holding node's id; NULL: detached.
    holder       INTEGER,
    -- Bumped by every change of holder; only ever incremented.
    generation   INTEGER NOT NULL DEFAULT 0,
    -- The holder before the last change, NULL when none.
    previous     INTEGER,
    -- JSON arrays of node ids: failover candidates in order, and nodes allowed to claim.
    standby      TEXT    NOT NULL DEFAULT '[]',
    allowed      TEXT    NOT NULL DEFAULT '[]',
    created_at   INTEGER NOT NULL,
    moved_at     INTEGER,
    UNIQUE (network, name),
    UNIQUE (network, address)
);
