-- Workload addresses (schema version 2), as in the SQLite schema.

CREATE TABLE workloads (
    id           BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    network      TEXT    NOT NULL REFERENCES networks (name),
    name         TEXT    NOT NULL,
    address      TEXT    NOT NULL,
    holder       BIGINT,
    generation   BIGINT  NOT NULL DEFAULT 0,
    previous     BIGINT,
    standby      TEXT    NOT NULL DEFAULT '[]',
    allowed      TEXT    NOT NULL DEFAULT '[]',
    created_at   BIGINT  NOT NULL,
    moved_at     BIGINT,
    CONSTRAINT "workloads.network, workloads.name" UNIQUE (network, name),
    CONSTRAINT "workloads.network, workloads.address" UNIQUE (network, address)
);
