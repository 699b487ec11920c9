-- IPv6 (schema version 13), as in the SQLite schema (version 8).

ALTER TABLE networks ADD COLUMN cidr6 TEXT;
