-- The change log (schema version 3), as in the SQLite schema. Commits that add a row also
-- send NOTIFY meshlink_changes with the network's name, so that the other coordinators read
-- the new rows at once.

CREATE TABLE changes (
    network   TEXT    NOT NULL REFERENCES networks (name),
    version   BIGINT  NOT NULL,
    kind      TEXT    NOT NULL,
    ref       TEXT    NOT NULL,
    PRIMARY KEY (network, version)
);
