-- Key rotation and node expiry (schema version 6).

-- The node's next WireGuard public key while it rotates (standard base64); NULL: none. A
-- network's keys are unique across both columns (checked in the write transaction that sets
-- one; this index keeps two nodes from ever holding the same next key).
ALTER TABLE nodes ADD COLUMN next_key TEXT;
-- When the node's current key became its key (Unix seconds); NULL: at join (created_at).
ALTER TABLE nodes ADD COLUMN key_since INTEGER;
-- When a rotation was asked for (an operator, or the network's schedule) and no next key was
-- announced since; NULL: none asked.
ALTER TABLE nodes ADD COLUMN rotation_asked INTEGER;
-- When the node was revoked for not checking in for the configured time; NULL: not expired.
ALTER TABLE nodes ADD COLUMN expired_at INTEGER;

CREATE UNIQUE INDEX "nodes.network, nodes.next_key" ON nodes (network, next_key);
