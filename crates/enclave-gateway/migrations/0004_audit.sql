-- The audit log: one row per API call, admin action and security event, each chained to the
-- one before by SHA-256 (see src/audit.rs for what each hash covers). Times are Unix
-- milliseconds. Personal fields (subject, source, text) are hashed with a per-record salt so
-- erasing them (fields and salt set to NULL) keeps the chain verifiable; pruned rows keep only
-- what the chain needs.
CREATE TABLE audit_log (
    seq BIGINT PRIMARY KEY,
    at_ms BIGINT NOT NULL,
    kind TEXT NOT NULL,
    request_id TEXT,
    tenant TEXT,
    method TEXT,
    route TEXT,
    model TEXT,
    status BIGINT,
    prompt_tokens BIGINT,
    completion_tokens BIGINT,
    latency_ms BIGINT,
    detail TEXT,
    subject TEXT,
    source TEXT,
    text TEXT,
    salt TEXT,
    personal_sha256 TEXT,
    content_sha256 TEXT NOT NULL,
    prev_sha256 TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    -- 1 once pruned (content gone), 1 once the subject's personal fields are erased.
    pruned BIGINT NOT NULL,
    erased BIGINT NOT NULL
);

CREATE INDEX audit_log_by_time ON audit_log (at_ms);
CREATE INDEX audit_log_by_subject ON audit_log (subject);

-- The chain's two ends: the newest record (where appends continue) and the anchor (the last
-- record deleted by pruning; all zeros before any).
CREATE TABLE audit_chain (
    id BIGINT PRIMARY KEY,
    last_seq BIGINT NOT NULL,
    last_sha256 TEXT NOT NULL,
    anchor_seq BIGINT NOT NULL,
    anchor_sha256 TEXT NOT NULL
);

INSERT INTO audit_chain (id, last_seq, last_sha256, anchor_seq, anchor_sha256) VALUES
    (1, 0, '0000000000000000000000000000000000000000000000000000000000000000',
     0, '0000000000000000000000000000000000000000000000000000000000000000');
