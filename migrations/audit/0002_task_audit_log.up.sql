-- The task audit log (the plan's "Task-Specific Audit Logging"): append-only, hash-chained.
-- mhv:run-as audit_owner
--
-- docs/security/audit-logging.md describes the canonical encoding, the chain and what these
-- guarantees do and do not cover. In short:
--   * {{audit_role}} may INSERT and SELECT rows, and move the chain head; nothing else;
--   * statement triggers refuse UPDATE, DELETE and TRUNCATE of the log to everyone, the
--     owner included;
--   * a row trigger refuses any insert that does not link to the row before it, and a
--     deferred trigger refuses to commit a chain head that is not the last row;
--   * what a superuser does with triggers disabled is caught by VerifyAuditChain.

CREATE TABLE task_audit_log (
    -- Position in the chain: 1, 2, 3, ... with no gaps. Assigned from the chain head under its
    -- lock rather than from a sequence (which leaves gaps on rollback), so that a gap always
    -- means a deleted row. Part of the hashed content.
    id          bigint       PRIMARY KEY CHECK (id > 0),
    -- The sender's event id: the idempotency key.
    event_id    uuid         NOT NULL UNIQUE,
    task_id     bigint       NOT NULL,
    event_type  varchar(100) NOT NULL,
    user_id     uuid         NOT NULL,
    -- The redacted details in RFC 8785 canonical JSON: the exact text the hash covers, so
    -- verifying a row never re-serialises JSON.
    details_canonical text   NOT NULL,
    -- The plan's details column, for queries: always the same JSON as the hashed text (a
    -- generated column cannot be written; verification also compares the two).
    details     jsonb        NOT NULL GENERATED ALWAYS AS (details_canonical::jsonb) STORED,
    -- When the change was committed in the task service.
    occur_time  timestamptz  NOT NULL CHECK (isfinite(occur_time)),
    -- When this service stored the row (database clock).
    created_at  timestamptz  NOT NULL DEFAULT now() CHECK (isfinite(created_at)),
    request_id  varchar(128) NOT NULL DEFAULT '',
    -- W3C trace id of the request that made the change: links webhook -> task -> audit.
    trace_id    varchar(32)  NOT NULL DEFAULT '',
    prev_hash   bytea        NOT NULL CHECK (octet_length(prev_hash) = 32),
    hash        bytea        NOT NULL CHECK (octet_length(hash) = 32)
);

-- The plan's four indexes. Each carries id as its last column so that "newest first, after
-- this cursor" is one index range scan, whatever the filter.
CREATE INDEX idx_task_audit_log_task_id ON task_audit_log (task_id, id);
CREATE INDEX idx_task_audit_log_user_id ON task_audit_log (user_id, id);
CREATE INDEX idx_task_audit_log_created_at ON task_audit_log (created_at);
CREATE INDEX idx_task_audit_log_event_type ON task_audit_log (event_type, id);

-- One row: the last appended id and hash. Appenders lock it FOR UPDATE, which serialises
-- them; verification compares it with the table, which reveals rows removed from or added
-- after the end of the chain.
CREATE TABLE chain_head (
    singleton  boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    last_id    bigint      NOT NULL CHECK (last_id >= 0),
    last_hash  bytea       NOT NULL CHECK (octet_length(last_hash) = 32),
    updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO chain_head (last_id, last_hash) VALUES (0, decode(repeat('00', 32), 'hex'));

CREATE FUNCTION refuse_audit_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit.% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'Audit rows are never changed or removed; see docs/security/audit-logging.md.';
END
$$;

-- Statement triggers, so that even a statement matching no row is refused.
CREATE TRIGGER task_audit_log_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON task_audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_audit_change();

CREATE FUNCTION check_audit_link() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- A row trigger sees the rows an INSERT wrote before this one, so a batch links row by row.
    IF NEW.id = 1 THEN
        IF NEW.prev_hash <> decode(repeat('00', 32), 'hex') THEN
            RAISE EXCEPTION 'audit row 1 must link to the genesis hash'
                USING ERRCODE = 'data_corrupted';
        END IF;
    ELSIF NOT EXISTS (
        SELECT 1 FROM audit.task_audit_log WHERE id = NEW.id - 1 AND hash = NEW.prev_hash
    ) THEN
        RAISE EXCEPTION 'audit row % does not link to row %', NEW.id, NEW.id - 1
            USING ERRCODE = 'data_corrupted';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER task_audit_log_linked
    BEFORE INSERT ON task_audit_log
    FOR EACH ROW EXECUTE FUNCTION check_audit_link();

CREATE FUNCTION guard_chain_head() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'UPDATE' THEN
        RAISE EXCEPTION 'audit.chain_head has exactly one row: % refused', TG_OP
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NEW.last_id <= OLD.last_id THEN
        RAISE EXCEPTION 'the audit chain head only moves forward (% -> %)', OLD.last_id, NEW.last_id
            USING ERRCODE = 'data_corrupted';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER chain_head_forward_only
    BEFORE INSERT OR UPDATE OR DELETE ON chain_head
    FOR EACH ROW EXECUTE FUNCTION guard_chain_head();
CREATE TRIGGER chain_head_no_truncate
    BEFORE TRUNCATE ON chain_head
    FOR EACH STATEMENT EXECUTE FUNCTION guard_chain_head();

CREATE FUNCTION check_chain_head() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Runs at commit, when the batch and the head update are both in place.
    IF NOT EXISTS (
        SELECT 1 FROM audit.task_audit_log WHERE id = NEW.last_id AND hash = NEW.last_hash
    ) OR EXISTS (SELECT 1 FROM audit.task_audit_log WHERE id > NEW.last_id) THEN
        RAISE EXCEPTION 'the audit chain head (row %) is not the last row of the log', NEW.last_id
            USING ERRCODE = 'data_corrupted';
    END IF;
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER chain_head_is_last_row
    AFTER UPDATE ON chain_head
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION check_chain_head();

REVOKE ALL ON task_audit_log, chain_head FROM PUBLIC;
GRANT SELECT, INSERT ON task_audit_log TO {{audit_role}};
-- UPDATE on the head's columns also lets the login role lock it (SELECT ... FOR UPDATE).
GRANT SELECT, UPDATE (last_id, last_hash, updated_at) ON chain_head TO {{audit_role}};
REVOKE ALL ON FUNCTION refuse_audit_change(), check_audit_link(), guard_chain_head(),
    check_chain_head() FROM PUBLIC;
