-- External nodes (schema version 12), as in the SQLite schema (version 7).

ALTER TABLE nodes ADD COLUMN via BIGINT;
