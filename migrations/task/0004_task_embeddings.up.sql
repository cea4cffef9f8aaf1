-- Semantic search: task embeddings (pgvector) and the queue of tasks waiting to be embedded.
-- mhv:requires-extension vector

-- One vector per task and model. The model name and the vector's length are stored with every
-- vector, so several models can coexist while `mhv reindex` switches from one to another; a
-- query is only ever compared with vectors of the model that embedded it.
CREATE TABLE task_embeddings (
    task_id        bigint      NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    model          text        NOT NULL CHECK (char_length(model) BETWEEN 1 AND 200),
    dimensions     integer     NOT NULL CHECK (dimensions BETWEEN 1 AND 2000),
    embedding      vector      NOT NULL CHECK (vector_dims(embedding) = dimensions),
    -- SHA-256 of the text that was embedded (title, newline, description): tells a reindex
    -- which vectors are already current.
    content_sha256 bytea       NOT NULL CHECK (octet_length(content_sha256) = 32),
    embedded_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, model)
);

-- HNSW needs a fixed length, so each model gets its own partial index on the vector cast to
-- that length; a search must repeat both the cast and the model predicate to use it (the
-- model as a literal, or a custom plan: a generic plan's `model = $n` cannot prove the
-- predicate). This one serves the packaged local model; `mhv reindex` creates the index of
-- any other model it switches to.
CREATE INDEX task_embeddings_hnsw_all_minilm_l6_v2 ON task_embeddings
    USING hnsw ((embedding::vector(384)) vector_cosine_ops)
    WHERE model = 'sentence-transformers/all-MiniLM-L6-v2';

-- Tasks whose text changed since they were last embedded. A trigger enqueues them in the
-- transaction that changed them; a worker claims rows with FOR UPDATE SKIP LOCKED under a
-- lease (claimed_until) held outside any transaction, embeds, then stores the vector and
-- deletes the row only if `generation` is still the one it claimed: an edit made while it was
-- embedding bumps the generation and the task is embedded again.
CREATE TABLE embedding_backlog (
    task_id       bigint      PRIMARY KEY REFERENCES tasks (id) ON DELETE CASCADE,
    generation    bigint      NOT NULL DEFAULT 1,
    enqueued_at   timestamptz NOT NULL DEFAULT now(),
    claimed_until timestamptz
);
CREATE INDEX idx_embedding_backlog_enqueued ON embedding_backlog (enqueued_at);

CREATE FUNCTION enqueue_task_embedding() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO embedding_backlog AS b (task_id) VALUES (NEW.id)
    ON CONFLICT (task_id) DO UPDATE
        SET generation = b.generation + 1, enqueued_at = now(), claimed_until = NULL;
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_embed_new AFTER INSERT ON tasks
    FOR EACH ROW EXECUTE FUNCTION enqueue_task_embedding();
CREATE TRIGGER tasks_embed_changed AFTER UPDATE OF title, description ON tasks
    FOR EACH ROW
    WHEN (OLD.title IS DISTINCT FROM NEW.title OR OLD.description IS DISTINCT FROM NEW.description)
    EXECUTE FUNCTION enqueue_task_embedding();

-- Tasks that existed before semantic search was enabled are embedded by the same worker.
INSERT INTO embedding_backlog (task_id) SELECT id FROM tasks;
