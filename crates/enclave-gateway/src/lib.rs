//! Enclave's access control and audit: TLS settings, identities (API keys, client
//! certificates, OIDC tokens), tenants, roles and permissions, rate limits and usage, the
//! hash-chained audit log, and the database they live in (SQLite in the data directory, or PostgreSQL). Knows nothing of
//! inference or HTTP: the server asks it who a caller is ([`Authenticator`]) and what that
//! [`Principal`] may do.
//!
//! Invariants:
//! - A key's secret is never stored or logged: only its SHA-256, compared in constant time.
//! - Anything not positively authenticated is `Unauthenticated`; a key whose role is no longer
//!   configured authenticates to nothing rather than to a default.
//! - A revocation is seen by every server on the same database within [`CACHE_TTL`].

mod abuse;
mod audit;
mod authenticator;
mod error;
mod keys;
mod limits;
mod oidc;
mod principal;
mod rbac;
mod store;
mod tls;
mod usage;

pub use abuse::{AbuseGuard, AbuseLimits, BlockStarted, Offender};
pub use audit::{
    erased_subject_sha256, parse_since, rfc3339, AuditCheckpoint, AuditEntry, AuditEvent,
    AuditKind, AuditLog, AuditProblem, AuditQuery, AuditQueueConfig, AuditQueueStats, AuditSlot,
    AuditVerification, Backpressure, PruneReport,
};
pub use authenticator::{unix_millis, unix_time, Authenticator, CertificateBinding, CACHE_TTL};
pub use error::{GatewayError, Result};
pub use keys::{key_id, KEY_PREFIX};
pub use limits::{Admission, Limits, Quota, Quotas, RateLimiter, Refusal, Subject};
pub use oidc::{JwksSource, OidcSettings, OidcVerifier, VerifiedToken, MIN_REFRESH};
pub use principal::{Identity, Principal};
pub use rbac::{ModelScope, Permission, Permissions, RoleOrigin, Roles, BUILT_IN_ROLES};
pub use store::{ChangeRecord, CreatedKey, KeyInfo, NewKey, Store, Tenant};
pub use tls::{
    certificate_subject, client_certificate, ClientAuth, ClientCertificate, TlsSettings,
};
pub use usage::{UsageCounts, UsageLedger, UsageRow};
