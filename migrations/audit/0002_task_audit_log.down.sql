-- mhv:run-as audit_owner
-- mhv:loses audit.task_audit_log
-- mhv:loses audit.chain_head WHERE last_id > 0
-- Dropping a table fires none of its triggers: only its owner (or a superuser) can do this.
DROP TABLE chain_head;
DROP TABLE task_audit_log;
DROP FUNCTION check_chain_head();
DROP FUNCTION guard_chain_head();
DROP FUNCTION check_audit_link();
DROP FUNCTION refuse_audit_change();
