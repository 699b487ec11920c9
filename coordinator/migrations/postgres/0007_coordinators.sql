-- The coordinators of the mesh as they report themselves (schema version 7, PostgreSQL
-- only): each refreshes its row every second with its session count, so `meshctl status`
-- lists them all, and one whose row is stale is shown down.

CREATE TABLE coordinators (
    address   TEXT   PRIMARY KEY,
    seen_ms   BIGINT NOT NULL,
    sessions  BIGINT NOT NULL
);
