//! The management API, served only on the admin listener (`--admin-port`): tenants, API keys
//! and usage. A caller manages its own tenant (`keys:manage`, `metrics:read`); other tenants,
//! and creating tenants, need `tenants:manage`. A key can only be given a role whose
//! permissions the caller holds itself, so `keys:manage` never mints a stronger key.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use enclave_gateway::{
    unix_time, Authenticator, GatewayError, KeyInfo, Limits, NewKey, Permission, Principal, Tenant,
    UsageRow,
};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Access;
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::generation::Meter;
use crate::state::AppState;

/// Every admin route, with the permission it needs (`None`: the public liveness probe).
pub const ADMIN_ROUTES: &[(&str, &str, Option<Permission>)] = &[
    ("GET", "/admin/v1/tenants", Some(Permission::TenantsManage)),
    ("POST", "/admin/v1/tenants", Some(Permission::TenantsManage)),
    ("GET", "/admin/v1/keys", Some(Permission::KeysManage)),
    ("POST", "/admin/v1/keys", Some(Permission::KeysManage)),
    (
        "DELETE",
        "/admin/v1/keys/{id}",
        Some(Permission::KeysManage),
    ),
    ("GET", "/admin/v1/usage", Some(Permission::MetricsRead)),
    ("GET", "/metrics", Some(Permission::MetricsRead)),
    ("GET", "/admin/v1/audit", Some(Permission::AuditRead)),
    ("GET", "/admin/v1/audit/verify", Some(Permission::AuditRead)),
    (
        "POST",
        "/admin/v1/audit/erase",
        Some(Permission::TenantsManage),
    ),
    ("GET", "/admin/v1/roles", Some(Permission::KeysManage)),
    ("POST", "/admin/v1/roles", Some(Permission::ConfigManage)),
    (
        "DELETE",
        "/admin/v1/roles/{name}",
        Some(Permission::ConfigManage),
    ),
    ("GET", "/livez", None),
];

fn authenticator(state: &AppState) -> Result<&Authenticator, ApiError> {
    match &state.access {
        Access::Keys(authenticator) => Ok(authenticator),
        Access::Disabled => Err(ApiError::not_found(
            "the admin API needs authentication to be on",
        )),
    }
}

/// What an admin action changed, for its audit record.
fn note(meter: &Meter, action: &str, mut detail: Value) {
    if let Some(meter) = meter {
        if let Some(object) = detail.as_object_mut() {
            object.insert("action".into(), json!(action));
        }
        meter.note(detail);
    }
}

/// An admin change whose audit record is written in the change's own transaction: neither
/// commits without the other, and the answer comes after both.
struct Change<'m> {
    trail: Option<&'m Arc<crate::audit::AuditTrail>>,
    action: &'static str,
    status: StatusCode,
}

/// The record-making function a store's `*_audited` method calls with what it changed.
type Recorder<'m, T> = Box<dyn Fn(&T) -> enclave_gateway::AuditEvent + Send + Sync + 'm>;

impl<'m> Change<'m> {
    fn new(meter: &'m Meter, action: &'static str, status: StatusCode) -> Self {
        Self {
            trail: meter.as_ref().and_then(|m| m.trail()),
            action,
            status,
        }
    }

    /// The record of the change, from `detail` of what it did (`None` without an audit log).
    fn record<T>(
        &self,
        detail: impl Fn(&T) -> Value + Send + Sync + 'm,
    ) -> Option<Recorder<'m, T>> {
        let trail = self.trail?;
        let (action, status) = (self.action, self.status.as_u16());
        Some(Box::new(move |done: &T| {
            let mut detail = detail(done);
            if let Some(object) = detail.as_object_mut() {
                object.insert("action".into(), json!(action));
            }
            trail.change_record(status, &detail)
        }))
    }

    /// The change and its record committed: the request writes no second record.
    fn committed(&self) {
        if let Some(trail) = self.trail {
            trail.written();
        }
    }
}

/// A gateway error as the client should see it.
fn gateway_error(error: GatewayError) -> ApiError {
    match error {
        GatewayError::Invalid { field, message } => {
            ApiError::invalid(Some(field.to_string()), message)
        }
        e @ GatewayError::NotFound(_) => ApiError::not_found(e.to_string()),
        e @ GatewayError::Exists(_) => ApiError {
            status: StatusCode::CONFLICT,
            ..ApiError::invalid(None, e.to_string())
        },
        GatewayError::Denied { field, message } => ApiError {
            param: Some(field.to_string()),
            ..ApiError::denied(message)
        },
        GatewayError::Unauthenticated(_) => ApiError::unauthenticated("the API key is not valid"),
        e @ GatewayError::Busy(_) => ApiError::unavailable("busy", e.to_string()),
        e @ (GatewayError::Database(_) | GatewayError::Migration(_) | GatewayError::Stopped(_)) => {
            tracing::error!(error = %e, "admin API: database");
            ApiError::unavailable("database_unavailable", "the database cannot be reached")
        }
    }
}

/// The tenant a request acts on: the caller's own, or another with `tenants:manage`. Another
/// tenant without it is reported missing, so its existence is not revealed.
fn tenant_for(caller: &Principal, requested: Option<&str>) -> Result<String, ApiError> {
    match requested {
        None => Ok(caller.tenant.clone()),
        Some(t) if t == caller.tenant || caller.can(Permission::TenantsManage) => Ok(t.into()),
        Some(t) => Err(ApiError::not_found(format!("tenant `{t}` does not exist"))),
    }
}

/// Which tenant a listing shows: only the caller's without `tenants:manage`; with it, all
/// (`None`) unless one is named.
fn tenant_filter(caller: &Principal, requested: Option<&str>) -> Result<Option<String>, ApiError> {
    match (requested, caller.can(Permission::TenantsManage)) {
        (None, true) => Ok(None),
        (requested, _) => tenant_for(caller, requested).map(Some),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LimitsBody {
    requests_per_minute: Option<u64>,
    tokens_per_minute: Option<u64>,
    concurrent_requests: Option<u64>,
}

impl LimitsBody {
    fn limits(body: Option<LimitsBody>) -> Limits {
        body.map_or_else(Limits::default, |b| Limits {
            requests_per_minute: b.requests_per_minute,
            tokens_per_minute: b.tokens_per_minute,
            concurrent_requests: b.concurrent_requests,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewTenantBody {
    name: String,
    models: Option<Vec<String>>,
    limits: Option<LimitsBody>,
}

pub(crate) async fn list_tenants(
    State(state): State<Arc<AppState>>,
) -> Result<Json<Value>, ApiError> {
    let tenants = authenticator(&state)?
        .store()
        .tenants()
        .await
        .map_err(gateway_error)?;
    Ok(Json(
        json!({"tenants": tenants.iter().map(tenant_json).collect::<Vec<_>>()}),
    ))
}

pub(crate) async fn create_tenant(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Principal>,
    Extension(meter): Extension<Meter>,
    ApiJson(body): ApiJson<NewTenantBody>,
) -> Result<Response, ApiError> {
    let models = body.models.unwrap_or_else(|| vec!["*".into()]);
    let change = Change::new(&meter, "tenant.create", StatusCode::CREATED);
    let record = change.record(tenant_json);
    let tenant = authenticator(&state)?
        .store()
        .create_tenant_audited(
            &body.name,
            &models,
            LimitsBody::limits(body.limits),
            unix_time(),
            record.as_deref(),
        )
        .await
        .map_err(gateway_error)?;
    change.committed();
    tracing::info!(subject = %caller.subject(), tenant = %tenant.name, "tenant created");
    Ok((StatusCode::CREATED, Json(tenant_json(&tenant))).into_response())
}

#[derive(Debug, Deserialize)]
pub(crate) struct KeysQuery {
    tenant: Option<String>,
}

pub(crate) async fn list_keys(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Principal>,
    Query(query): Query<KeysQuery>,
) -> Result<Json<Value>, ApiError> {
    let tenant = tenant_filter(&caller, query.tenant.as_deref())?;
    let keys = authenticator(&state)?
        .store()
        .keys(tenant.as_deref())
        .await
        .map_err(gateway_error)?;
    Ok(Json(
        json!({"keys": keys.iter().map(key_json).collect::<Vec<_>>()}),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewKeyBody {
    tenant: Option<String>,
    role: String,
    models: Option<Vec<String>>,
    name: Option<String>,
    /// Seconds until it expires; none: until revoked.
    expires_in: Option<u64>,
    limits: Option<LimitsBody>,
}

pub(crate) async fn create_key(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Principal>,
    Extension(meter): Extension<Meter>,
    ApiJson(body): ApiJson<NewKeyBody>,
) -> Result<Response, ApiError> {
    let authenticator = authenticator(&state)?;
    let tenant = tenant_for(&caller, body.tenant.as_deref())?;
    // Read now, not from the cache: a role deleted a moment ago must not be given.
    let roles = authenticator
        .store()
        .roles(authenticator.configured_roles())
        .await
        .map_err(gateway_error)?;
    let granted = roles.require(&body.role).map_err(gateway_error)?;
    if let Some(missing) = granted.iter().find(|p| !caller.can(*p)) {
        return Err(ApiError::denied(format!(
            "role `{}` grants `{missing}`, which the caller does not hold; a key cannot be \
             given more than its creator has",
            body.role
        )));
    }
    let now = unix_time();
    let expires_at = body
        .expires_in
        .map(|s| now.saturating_add(i64::try_from(s).unwrap_or(i64::MAX)));
    let models = body.models.unwrap_or_else(|| vec!["*".into()]);
    let limits = LimitsBody::limits(body.limits);
    // Nor more models, looser limits or a longer life than the creating key has.
    caller
        .check_delegation(&models, &limits, expires_at)
        .map_err(gateway_error)?;
    let change = Change::new(&meter, "key.create", StatusCode::CREATED);
    let record = change.record(key_json);
    let created = authenticator
        .store()
        .create_key_audited(
            NewKey {
                tenant,
                role: body.role,
                models,
                name: body.name.unwrap_or_default(),
                expires_at,
                limits,
                created_by: caller.subject(),
            },
            &roles,
            now,
            record.as_deref(),
        )
        .await
        .map_err(gateway_error)?;
    change.committed();
    tracing::info!(subject = %caller.subject(), key = %created.info.id, tenant = %created.info.tenant, role = %created.info.role, "key created");
    let mut body = key_json(&created.info);
    body["key"] = json!(created.key);
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

pub(crate) async fn revoke_key(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Principal>,
    Extension(meter): Extension<Meter>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let store = authenticator(&state)?.store();
    let missing = || ApiError::not_found(format!("key `{id}` does not exist"));
    let key = store
        .key(&id)
        .await
        .map_err(gateway_error)?
        .ok_or_else(missing)?;
    tenant_for(&caller, Some(&key.tenant)).map_err(|_| missing())?;
    let change = Change::new(&meter, "key.revoke", StatusCode::OK);
    let record = change.record(key_json);
    let key = store
        .revoke_key_audited(&id, unix_time(), record.as_deref())
        .await
        .map_err(gateway_error)?;
    change.committed();
    tracing::info!(subject = %caller.subject(), key = %key.id, tenant = %key.tenant, "key revoked");
    Ok(Json(key_json(&key)))
}

#[derive(Debug, Deserialize)]
pub(crate) struct UsageQuery {
    tenant: Option<String>,
    key: Option<String>,
    days: Option<u32>,
}

pub(crate) async fn usage(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Principal>,
    Query(query): Query<UsageQuery>,
) -> Result<Json<Value>, ApiError> {
    let tenant = tenant_filter(&caller, query.tenant.as_deref())?;
    let days = i64::from(query.days.unwrap_or(30).min(3660));
    let rows = authenticator(&state)?
        .store()
        .usage(
            tenant.as_deref(),
            query.key.as_deref(),
            unix_time() - days * 86_400,
        )
        .await
        .map_err(gateway_error)?;
    Ok(Json(
        json!({"usage": rows.iter().map(usage_json).collect::<Vec<_>>()}),
    ))
}

/// The roles keys may be given (built-in, configured and stored), with their permissions.
pub(crate) async fn list_roles(
    State(state): State<Arc<AppState>>,
) -> Result<Json<Value>, ApiError> {
    let roles = authenticator(&state)?
        .roles()
        .await
        .map_err(gateway_error)?;
    Ok(Json(roles_json(&roles)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewRoleBody {
    name: String,
    permissions: Vec<String>,
    description: Option<String>,
}

/// Creates a role in the database. The caller must hold every permission it grants, so
/// `config:manage` cannot define its way to more.
pub(crate) async fn create_role(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Principal>,
    Extension(meter): Extension<Meter>,
    ApiJson(body): ApiJson<NewRoleBody>,
) -> Result<Response, ApiError> {
    let authenticator = authenticator(&state)?;
    for name in &body.permissions {
        let permission = Permission::parse(name).map_err(gateway_error)?;
        if !caller.can(permission) {
            return Err(ApiError::denied(format!(
                "the role would grant `{permission}`, which the caller does not hold"
            )));
        }
    }
    let description = body.description.unwrap_or_default();
    let change = Change::new(&meter, "role.create", StatusCode::CREATED);
    let record = change.record(|permissions: &enclave_gateway::Permissions| {
        role_json(
            &body.name,
            *permissions,
            enclave_gateway::RoleOrigin::Stored,
            &description,
        )
    });
    let permissions = authenticator
        .store()
        .create_role_audited(
            &body.name,
            &body.permissions,
            &description,
            authenticator.configured_roles(),
            unix_time(),
            record.as_deref(),
        )
        .await
        .map_err(gateway_error)?;
    change.committed();
    authenticator.forget_roles();
    tracing::info!(subject = %caller.subject(), role = %body.name, "role created");
    let role = role_json(
        &body.name,
        permissions,
        enclave_gateway::RoleOrigin::Stored,
        &description,
    );
    Ok((StatusCode::CREATED, Json(role)).into_response())
}

/// Deletes a role created in the database (built-in and configured ones cannot be).
pub(crate) async fn delete_role(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Principal>,
    Extension(meter): Extension<Meter>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let authenticator = authenticator(&state)?;
    if let Some(origin) = authenticator.configured_roles().origin(&name) {
        return Err(ApiError::invalid(
            Some("role".into()),
            format!(
                "`{name}` is a {} role; only roles created in the database can be deleted",
                origin.name()
            ),
        ));
    }
    let change = Change::new(&meter, "role.delete", StatusCode::NO_CONTENT);
    let record = change.record(|_: &()| json!({ "name": name }));
    authenticator
        .store()
        .delete_role_audited(&name, unix_time(), record.as_deref())
        .await
        .map_err(gateway_error)?;
    change.committed();
    authenticator.forget_roles();
    tracing::info!(subject = %caller.subject(), role = %name, "role deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
pub(crate) struct AuditQueryParams {
    /// `2026-11-01`, RFC 3339, `7d`, or Unix milliseconds.
    since: Option<String>,
    /// Records after this sequence number (paging: the last one seen).
    after: Option<i64>,
    tenant: Option<String>,
    /// At most this many (default 100, at most 1,000).
    limit: Option<u32>,
}

/// `GET /admin/v1/audit`: records oldest first; the caller's tenant's only, unless it holds
/// `tenants:manage`.
pub(crate) async fn audit_records(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Principal>,
    Query(params): Query<AuditQueryParams>,
) -> Result<Json<Value>, ApiError> {
    let tenant = tenant_filter(&caller, params.tenant.as_deref())?;
    let since_ms = params
        .since
        .as_deref()
        .map(|s| enclave_gateway::parse_since(s, enclave_gateway::unix_millis()))
        .transpose()
        .map_err(gateway_error)?;
    let entries = authenticator(&state)?
        .store()
        .audit_entries(&enclave_gateway::AuditQuery {
            since_ms,
            after_seq: params.after,
            tenant,
            limit: params.limit.unwrap_or(100).clamp(1, 1000),
            newest: false,
        })
        .await
        .map_err(gateway_error)?;
    Ok(Json(json!({
        "records": entries.iter().map(|e| e.to_json()).collect::<Vec<_>>(),
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct VerifyParams {
    /// Walk the whole chain, not only what came after the last clean verification.
    full: Option<bool>,
}

/// `GET /admin/v1/audit/verify[?full=true]`: checks the chain from where the last clean
/// verification of this server ended (that record must still have the hash it had, and the
/// anchor must not have moved), or the whole chain.
pub(crate) async fn audit_verify(
    State(state): State<Arc<AppState>>,
    Query(params): Query<VerifyParams>,
) -> Result<Json<Value>, ApiError> {
    let checkpoint = if params.full.unwrap_or(false) {
        None
    } else {
        state
            .audit_checkpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    };
    let (report, reached) = authenticator(&state)?
        .store()
        .verify_audit_since(checkpoint.as_ref())
        .await
        .map_err(gateway_error)?;
    *state
        .audit_checkpoint
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = reached;
    Ok(Json(verification_json(&report)))
}

/// A verification as the admin API and `enclave audit verify --json` show it.
pub fn verification_json(report: &enclave_gateway::AuditVerification) -> Value {
    json!({
        "ok": report.problem.is_none(),
        "from_seq": report.from_seq,
        "records": report.records,
        "pruned": report.pruned,
        "erased": report.erased,
        "head_seq": report.head_seq,
        "head_sha256": report.head_sha256,
        "problem": report.problem.as_ref().map(|p| json!({"seq": p.seq, "reason": p.reason})),
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EraseBody {
    /// The subject: `key:<id>`, `token:<sub>`, `cert:<subject>`, or the bare id.
    user: String,
}

/// `POST /admin/v1/audit/erase`: removes a data subject's personal fields from every record,
/// with the `audit.erase` record (the records erased, the subject's salted hash) in the same
/// transaction; the call's own record holds the count, not the subject.
pub(crate) async fn audit_erase(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Principal>,
    Extension(meter): Extension<Meter>,
    ApiJson(body): ApiJson<EraseBody>,
) -> Result<Json<Value>, ApiError> {
    let erased = authenticator(&state)?
        .store()
        .erase_audit_subject(
            &body.user,
            enclave_gateway::unix_millis(),
            &caller.subject(),
        )
        .await
        .map_err(gateway_error)?;
    note(&meter, "audit.erase", json!({ "records": erased }));
    Ok(Json(json!({ "erased": erased })))
}

/// Roles as the admin API and `enclave roles list --json` show them.
pub fn roles_json(roles: &enclave_gateway::Roles) -> Value {
    let roles: Vec<Value> = roles
        .names()
        .filter_map(|name| {
            Some(role_json(
                name,
                roles.permissions(name)?,
                roles.origin(name)?,
                roles.description(name).unwrap_or_default(),
            ))
        })
        .collect();
    json!({ "roles": roles })
}

/// One role as the admin API and the CLI show it.
pub fn role_json(
    name: &str,
    permissions: enclave_gateway::Permissions,
    origin: enclave_gateway::RoleOrigin,
    description: &str,
) -> Value {
    let permissions: Vec<&str> = permissions.iter().map(Permission::name).collect();
    json!({
        "name": name,
        "permissions": permissions,
        "built_in": origin == enclave_gateway::RoleOrigin::BuiltIn,
        "origin": origin.name(),
        "description": description,
    })
}

fn limits_json(limits: &Limits) -> Value {
    json!({
        "requests_per_minute": limits.requests_per_minute,
        "tokens_per_minute": limits.tokens_per_minute,
        "concurrent_requests": limits.concurrent_requests,
    })
}

/// A key as the admin API and `enclave keys … --json` show it (never its secret).
pub fn key_json(key: &KeyInfo) -> Value {
    let now = unix_time();
    let state = if key.revoked_at.is_some() {
        "revoked"
    } else if key.expires_at.is_some_and(|at| at <= now) {
        "expired"
    } else {
        "active"
    };
    json!({
        "id": key.id,
        "tenant": key.tenant,
        "role": key.role,
        "models": key.models.patterns(),
        "name": key.name,
        "limits": limits_json(&key.limits),
        "state": state,
        "created_at": key.created_at,
        "expires_at": key.expires_at,
        "revoked_at": key.revoked_at,
        "last_used_at": key.last_used_at,
        "created_by": key.created_by,
    })
}

/// A tenant as the admin API and `enclave tenants … --json` show it.
pub fn tenant_json(tenant: &Tenant) -> Value {
    json!({
        "name": tenant.name,
        "models": tenant.models.patterns(),
        "limits": limits_json(&tenant.limits),
        "created_at": tenant.created_at,
    })
}

/// A usage row as the admin API and `enclave usage --json` show it.
pub fn usage_json(row: &UsageRow) -> Value {
    json!({
        "day": row.day,
        "tenant": row.tenant,
        "key_id": row.key_id,
        "requests": row.counts.requests,
        "prompt_tokens": row.counts.prompt_tokens,
        "completion_tokens": row.counts.completion_tokens,
    })
}
