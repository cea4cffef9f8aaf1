-- mhv:run-as admin
-- Gives the schema back to the login role. The owner role stays, as the login roles do: roles
-- are cluster-wide and may own objects in other databases.
REVOKE USAGE ON SCHEMA audit FROM {{audit_role}};
ALTER SCHEMA audit OWNER TO {{audit_role}};
