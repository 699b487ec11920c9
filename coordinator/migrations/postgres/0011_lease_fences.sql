-- Lease fences with owners (schema version 11, PostgreSQL only). Each coordinator that is
-- giving a holder's workloads away without its knowledge (a failover, a move away from a
-- quiet holder) fences the holder under a token of its own and lifts only that fence: a node
-- stays fenced while any live fence of it remains. `leases.fenced_until_ms` is kept as the
-- latest end of the node's fences, rewritten under the lease row's lock with each fence and
-- lift, so that a renewal (one statement, locking the same row) sees every committed fence.

CREATE TABLE lease_fences (
    -- The fence's owner: given by the database, unique among every coordinator's fences.
    token     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The fenced node (a row of `leases`).
    node      BIGINT NOT NULL,
    -- Until then the fence holds even if its owner never lifts it (it died half-way).
    until_ms  BIGINT NOT NULL
);

CREATE INDEX lease_fences_node ON lease_fences (node);
