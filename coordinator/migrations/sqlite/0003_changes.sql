-- The change log (schema version 3): one row per map version of a network, naming what
-- changed, so that every coordinator sharing the database can bring its sessions from any
-- version to the latest in order. Only the most recent versions of each network are kept.

CREATE TABLE changes (
    network   TEXT    NOT NULL REFERENCES networks (name),
    version   INTEGER NOT NULL,
    -- 'node' (ref: node id), 'workload' (ref: workload name) or 'network' (ref: '').
    kind      TEXT    NOT NULL,
    ref       TEXT    NOT NULL,
    PRIMARY KEY (network, version)
);
