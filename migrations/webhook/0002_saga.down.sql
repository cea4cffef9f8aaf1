-- Drops issue links and the workers' leases.
-- mhv:loses webhook.issue_links
-- mhv:loses webhook.deliveries WHERE leased_by IS NOT NULL OR leased_until IS NOT NULL
DROP TABLE IF EXISTS issue_links;
DROP INDEX IF EXISTS deliveries_claimable;
ALTER TABLE deliveries DROP COLUMN IF EXISTS leased_until, DROP COLUMN IF EXISTS leased_by;
