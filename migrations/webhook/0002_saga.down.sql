DROP TABLE IF EXISTS issue_links;
DROP INDEX IF EXISTS deliveries_claimable;
ALTER TABLE deliveries DROP COLUMN IF EXISTS leased_until, DROP COLUMN IF EXISTS leased_by;
