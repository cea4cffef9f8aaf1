-- Roles and schemas: one slice per service, each owned and used by its own login role.
-- mhv:run-as admin
--
-- {{task_role}}, {{audit_role}} and {{webhook_role}} are substituted by the migration runner
-- (role names carry a configurable prefix, so several deployments can share a cluster).

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {{task_role_literal}}) THEN
        CREATE ROLE {{task_role}} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {{audit_role_literal}}) THEN
        CREATE ROLE {{audit_role}} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {{webhook_role_literal}}) THEN
        CREATE ROLE {{webhook_role}} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT;
    END IF;
END
$$;

-- Nobody but the three service roles (and the administrator) may connect.
REVOKE ALL ON DATABASE {{database}} FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE {{database}} TO {{task_role}}, {{audit_role}}, {{webhook_role}};

-- The public schema is nobody's workspace.
REVOKE ALL ON SCHEMA public FROM PUBLIC;

CREATE SCHEMA task AUTHORIZATION {{task_role}};
CREATE SCHEMA audit AUTHORIZATION {{audit_role}};
CREATE SCHEMA webhook AUTHORIZATION {{webhook_role}};

-- Schemas start with no rights for anyone but their owner; spelled out for reviewers.
REVOKE ALL ON SCHEMA task FROM PUBLIC;
REVOKE ALL ON SCHEMA audit FROM PUBLIC;
REVOKE ALL ON SCHEMA webhook FROM PUBLIC;

ALTER ROLE {{task_role}} IN DATABASE {{database}} SET search_path = task;
ALTER ROLE {{audit_role}} IN DATABASE {{database}} SET search_path = audit;
ALTER ROLE {{webhook_role}} IN DATABASE {{database}} SET search_path = webhook;
