-- The audit slice's owner: a role nobody logs in as.
-- mhv:run-as admin
--
-- The service's login role may only append and read. Whoever owns a table may alter it, drop
-- it or disable its triggers, and whoever owns a schema may drop anything in it, so neither the
-- audit tables nor the schema can belong to the login role: both go to {{audit_owner_role}},
-- a NOLOGIN role with no members. Acting as it takes a superuser.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {{audit_owner_role_literal}}) THEN
        CREATE ROLE {{audit_owner_role}}
            NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION NOBYPASSRLS;
    END IF;
END
$$;

ALTER SCHEMA audit OWNER TO {{audit_owner_role}};
REVOKE ALL ON SCHEMA audit FROM PUBLIC;
-- The login role keeps only the right to look names up in the schema: no CREATE.
GRANT USAGE ON SCHEMA audit TO {{audit_role}};
