-- Roles created at run time (`enclave roles create`, the admin API), beside the built-in
-- ones and those of the configuration file. Permissions are names, comma-separated.
CREATE TABLE roles (
    name TEXT PRIMARY KEY,
    permissions TEXT NOT NULL,
    description TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
