-- pgvector for semantic search, in the task schema (the task role sees only that schema).
-- mhv:run-as admin
-- mhv:requires-extension vector
--
-- Creating an extension takes an administrator. On a server that does not offer pgvector
-- (`pg_available_extensions` has no `vector`), the migration runner holds this migration and
-- every other one that declares `mhv:requires-extension vector` back, unrecorded: keyword
-- search works without them, and the next `mhv migrate` on a server that gained pgvector
-- applies them.

CREATE EXTENSION IF NOT EXISTS vector WITH SCHEMA task;

DO $$
DECLARE
    home name;
BEGIN
    SELECT n.nspname INTO home
    FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
    WHERE e.extname = 'vector';
    IF home <> 'task' THEN
        RAISE EXCEPTION 'pgvector is already installed in schema "%" of this database', home
            USING HINT = 'The task role sees only its own schema: ALTER EXTENSION vector SET SCHEMA task, or drop it, then migrate again.';
    END IF;
END
$$;
