-- Drops unfinished issue claims (no task yet, or whose delivery was purged) and the
-- record of which sagas created their task.
-- mhv:loses webhook.issue_links WHERE task_id IS NULL OR delivery NOT IN (SELECT id FROM webhook.deliveries)
-- mhv:loses webhook.saga_log WHERE created_task
DROP INDEX IF EXISTS deliveries_finished;
ALTER TABLE saga_log DROP COLUMN IF EXISTS created_task;
DELETE FROM issue_links WHERE task_id IS NULL
    OR delivery NOT IN (SELECT id FROM deliveries);
ALTER TABLE issue_links ALTER COLUMN task_id SET NOT NULL;
ALTER TABLE issue_links ADD CONSTRAINT issue_links_delivery_fkey
    FOREIGN KEY (delivery) REFERENCES deliveries (id) ON DELETE CASCADE;
