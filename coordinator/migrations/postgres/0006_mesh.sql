-- Facts about the mesh every coordinator sharing the database must agree on (schema version
-- 6, PostgreSQL only): the fingerprint of the coordinators' shared TLS certificate, which
-- join tokens pin. A coordinator with another certificate refuses to start.

CREATE TABLE mesh (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
