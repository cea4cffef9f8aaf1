-- The embedding trigger names embedding_backlog unqualified: it worked only in sessions whose
-- search_path starts with the task schema (the task role's). An administrator's insert or
-- COPY into task.tasks (restoring rows after a mistake, docs/runbooks/disaster-recovery.md)
-- failed with "relation embedding_backlog does not exist". The function now carries its own
-- search_path, whoever fires it.
-- mhv:requires-extension vector
ALTER FUNCTION enqueue_task_embedding() SET search_path = task, pg_temp;
