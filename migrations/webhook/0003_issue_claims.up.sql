-- Issue claims: one saga at a time creates an issue's task, and a crash in between loses
-- nothing.
--
-- A saga that needs to create an issue's task first commits a claim: an issue_links row with no
-- task yet, owned by its delivery. Only then does it ask the task service to create the task
-- (with an idempotency key derived from its delivery), and it records the task id on the claim
-- afterwards. Another delivery about the same issue that finds an unfinished claim waits and
-- retries; the owner, if it died, resumes and its repeated create returns the same task.

ALTER TABLE issue_links ALTER COLUMN task_id DROP NOT NULL;
-- The owning delivery may be purged after its retention; the link must outlive it.
ALTER TABLE issue_links DROP CONSTRAINT issue_links_delivery_fkey;

-- Whether this saga created the task it works on (only then may compensation cancel it).
ALTER TABLE saga_log ADD COLUMN created_task boolean NOT NULL DEFAULT false;

-- Finished deliveries are purged after their retention, oldest first.
CREATE INDEX deliveries_finished ON deliveries (updated_at)
    WHERE state IN ('completed', 'ignored', 'compensated');
