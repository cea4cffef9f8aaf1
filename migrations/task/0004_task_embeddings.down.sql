-- Drops the embeddings (recomputable: `mhv reindex`) and the embedding queue.
-- mhv:loses task.task_embeddings
-- mhv:loses task.embedding_backlog
DROP TRIGGER IF EXISTS tasks_embed_changed ON tasks;
DROP TRIGGER IF EXISTS tasks_embed_new ON tasks;
DROP FUNCTION IF EXISTS enqueue_task_embedding();
DROP TABLE IF EXISTS embedding_backlog;
DROP TABLE IF EXISTS task_embeddings;
