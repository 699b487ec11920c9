-- Workload leases shared by the coordinators of one database (schema version 4, PostgreSQL
-- only: a lone SQLite coordinator keeps them in memory). Times are milliseconds of the
-- database's own clock, so coordinators on different hosts compare them without skew.

CREATE TABLE leases (
    -- A node that heartbeats as a workload holder.
    node             BIGINT PRIMARY KEY,
    -- When a coordinator last renewed its lease.
    heard_ms         BIGINT NOT NULL,
    -- Until then no coordinator renews it: the failover leader is taking its workloads.
    fenced_until_ms  BIGINT NOT NULL DEFAULT 0
);
