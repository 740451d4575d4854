-- Rate limits of tenants and keys (NULL: unlimited), and usage per tenant, key and UTC day.
ALTER TABLE tenants ADD COLUMN requests_per_minute BIGINT;
ALTER TABLE tenants ADD COLUMN tokens_per_minute BIGINT;
ALTER TABLE tenants ADD COLUMN concurrent_requests BIGINT;
ALTER TABLE api_keys ADD COLUMN requests_per_minute BIGINT;
ALTER TABLE api_keys ADD COLUMN tokens_per_minute BIGINT;
ALTER TABLE api_keys ADD COLUMN concurrent_requests BIGINT;

CREATE TABLE usage (
    tenant TEXT NOT NULL,
    -- The key's id; '' when authentication is off.
    key_id TEXT NOT NULL,
    -- Unix time of the start of the UTC day.
    day BIGINT NOT NULL,
    requests BIGINT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    PRIMARY KEY (tenant, key_id, day)
);
