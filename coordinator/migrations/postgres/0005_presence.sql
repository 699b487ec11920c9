-- Which coordinator each online node has its session with (schema version 5, PostgreSQL
-- only), so that the failover leader knows which standbys are online anywhere. Each
-- coordinator refreshes its rows every second; rows older than a few seconds belong to a
-- coordinator that died and are ignored.

CREATE TABLE presence (
    node         BIGINT PRIMARY KEY,
    coordinator  TEXT   NOT NULL,
    seen_ms      BIGINT NOT NULL
);
