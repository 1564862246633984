-- 0015: a lease's resource count. `leases.resources`: how many rows of `lease_resources` the lease
-- has, kept by every add and removal in its own transaction (in the same statement), so an add
-- checks `gc::LEASE_RESOURCES_MAX` by reading one row instead of counting up to a million. Leases
-- from before this migration are counted once here. Mirrored in the SQLite migration of the same
-- number.
ALTER TABLE leases ADD COLUMN resources BIGINT NOT NULL DEFAULT 0;
UPDATE leases SET resources = (SELECT count(*) FROM lease_resources r WHERE r.lease_id = leases.id);
