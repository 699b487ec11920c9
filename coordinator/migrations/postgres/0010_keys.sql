-- Key rotation and node expiry (schema version 10), as in the SQLite schema (version 6).

ALTER TABLE nodes ADD COLUMN next_key TEXT;
ALTER TABLE nodes ADD COLUMN key_since BIGINT;
ALTER TABLE nodes ADD COLUMN rotation_asked BIGINT;
ALTER TABLE nodes ADD COLUMN expired_at BIGINT;

ALTER TABLE nodes ADD CONSTRAINT "nodes.network, nodes.next_key" UNIQUE (network, next_key);
