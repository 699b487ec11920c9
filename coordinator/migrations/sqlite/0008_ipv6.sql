-- IPv6 (schema version 8): a network's ULA /48, NULL: none. Its nodes' and workloads' IPv6
-- addresses are derived from it and their IPv4 addresses (the /48 with the IPv4 address in
-- the low 32 bits), so nothing else is stored.
ALTER TABLE networks ADD COLUMN cidr6 TEXT;
