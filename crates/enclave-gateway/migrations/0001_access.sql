-- Tenants, and the API keys that act for them. Portable SQL: the same file runs on SQLite and
-- PostgreSQL. Times are Unix seconds; model scopes are glob patterns, one per line.
CREATE TABLE tenants (
    name TEXT PRIMARY KEY,
    models TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- Every deployment starts with one tenant that may use every model.
INSERT INTO tenants (name, models, created_at) VALUES ('default', '*', 0);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    -- SHA-256 of the whole key, hex; the key itself is never stored.
    secret_sha256 TEXT NOT NULL,
    tenant TEXT NOT NULL REFERENCES tenants (name),
    role TEXT NOT NULL,
    models TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    revoked_at BIGINT,
    last_used_at BIGINT
);

CREATE INDEX api_keys_by_tenant ON api_keys (tenant);
