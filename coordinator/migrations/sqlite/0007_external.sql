-- External nodes (schema version 7): devices that run stock WireGuard, with no agent. The
-- node whose agent is their gateway (it forwards their packets to and from the mesh); NULL: a
-- node with an agent. An external node has no secret (its secret_hash matches none) and never
-- a session.
ALTER TABLE nodes ADD COLUMN via INTEGER;
