-- mhv:run-as admin
-- Drops the three slices with everything in them. Roles stay (they are cluster-wide and may
-- own objects in other databases); drop them by hand (DROP ROLE) once no database uses them.
-- mhv:loses task.*
-- mhv:loses audit.*
-- mhv:loses webhook.*
DROP SCHEMA IF EXISTS webhook CASCADE;
DROP SCHEMA IF EXISTS audit CASCADE;
DROP SCHEMA IF EXISTS task CASCADE;
ALTER ROLE {{task_role}} IN DATABASE {{database}} RESET search_path;
ALTER ROLE {{audit_role}} IN DATABASE {{database}} RESET search_path;
ALTER ROLE {{webhook_role}} IN DATABASE {{database}} RESET search_path;
REVOKE ALL ON DATABASE {{database}} FROM {{task_role}}, {{audit_role}}, {{webhook_role}};
GRANT CONNECT, TEMPORARY ON DATABASE {{database}} TO PUBLIC;
GRANT USAGE ON SCHEMA public TO PUBLIC;
