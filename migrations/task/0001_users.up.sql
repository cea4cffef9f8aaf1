-- Users (the plan's "Users Table Schema"): people who create, own and work on tasks.

CREATE TABLE users (
    id            uuid         PRIMARY KEY DEFAULT gen_random_uuid(),
    username      varchar(100) NOT NULL UNIQUE,
    email         varchar(255) NOT NULL UNIQUE,
    display_name  varchar(200),
    created_at    timestamptz  NOT NULL DEFAULT now(),
    updated_at    timestamptz  NOT NULL DEFAULT now(),
    last_login_at timestamptz,
    is_active     boolean      NOT NULL DEFAULT true,
    metadata      jsonb        NOT NULL DEFAULT '{}'::jsonb
);

-- The plan also indexes username and email; the UNIQUE constraints above already create
-- exactly those indexes, so separate ones would only double the write cost.
