//! Permissions, roles and model scopes: what an authenticated caller may do, and with which
//! models.

use std::collections::BTreeMap;
use std::fmt;

use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::error::{GatewayError, Result};

/// One thing a caller may be allowed to do, at the granularity of the API's routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Permission {
    /// Completions, chat completions, tokenize and detokenize.
    Inference,
    /// List and read the models the caller's tenant may use.
    ModelsRead,
    /// Load, roll out and roll back models.
    ModelsManage,
    /// Create, list and revoke API keys of the caller's tenant.
    KeysManage,
    /// Create and change tenants.
    TenantsManage,
    /// Read metrics and usage.
    MetricsRead,
    /// Read the audit log.
    AuditRead,
    /// Change the running configuration.
    ConfigManage,
}

impl Permission {
    pub const ALL: [Permission; 8] = [
        Permission::Inference,
        Permission::ModelsRead,
        Permission::ModelsManage,
        Permission::KeysManage,
        Permission::TenantsManage,
        Permission::MetricsRead,
        Permission::AuditRead,
        Permission::ConfigManage,
    ];

    /// The name used in configuration files and messages (`models:read`).
    pub fn name(self) -> &'static str {
        match self {
            Permission::Inference => "inference",
            Permission::ModelsRead => "models:read",
            Permission::ModelsManage => "models:manage",
            Permission::KeysManage => "keys:manage",
            Permission::TenantsManage => "tenants:manage",
            Permission::MetricsRead => "metrics:read",
            Permission::AuditRead => "audit:read",
            Permission::ConfigManage => "config:manage",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| {
                GatewayError::invalid(
                    "permissions",
                    format!(
                        "unknown permission `{name}` (known: {})",
                        Self::ALL.map(Permission::name).join(", ")
                    ),
                )
            })
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of permissions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Permissions(u16);

impl Permissions {
    pub fn all() -> Self {
        Self::of(&Permission::ALL)
    }

    pub fn of(permissions: &[Permission]) -> Self {
        Self(permissions.iter().fold(0, |bits, p| bits | p.bit()))
    }

    pub fn contains(self, permission: Permission) -> bool {
        self.0 & permission.bit() != 0
    }

    pub fn iter(self) -> impl Iterator<Item = Permission> {
        Permission::ALL
            .into_iter()
            .filter(move |p| self.contains(*p))
    }
}

/// The built-in roles, each with what it is for.
pub const BUILT_IN_ROLES: [(&str, &[Permission], &str); 6] = [
    (
        "admin",
        &Permission::ALL,
        "everything, including tenants, keys and configuration",
    ),
    (
        "operator",
        &[
            Permission::Inference,
            Permission::ModelsRead,
            Permission::ModelsManage,
            Permission::MetricsRead,
            Permission::ConfigManage,
        ],
        "runs the service: models, configuration, metrics; no keys or tenants",
    ),
    (
        "developer",
        &[Permission::Inference, Permission::ModelsRead],
        "builds applications: inference and the model list",
    ),
    (
        "analyst",
        &[Permission::ModelsRead, Permission::MetricsRead],
        "reads usage and metrics; no inference",
    ),
    (
        "auditor",
        &[Permission::AuditRead, Permission::MetricsRead],
        "reads the audit log and metrics; nothing else",
    ),
    (
        "viewer",
        &[Permission::ModelsRead],
        "sees which models exist",
    ),
];

/// Where a role is defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleOrigin {
    BuiltIn,
    /// The configuration file's `[roles]`.
    Configured,
    /// The database (`enclave roles create`, `POST /admin/v1/roles`).
    Stored,
}

impl RoleOrigin {
    pub fn name(self) -> &'static str {
        match self {
            RoleOrigin::BuiltIn => "built-in",
            RoleOrigin::Configured => "configuration",
            RoleOrigin::Stored => "database",
        }
    }
}

#[derive(Debug, Clone)]
struct RoleEntry {
    permissions: Permissions,
    origin: RoleOrigin,
    description: String,
}

/// Every role a key may hold: the built-in ones, those the configuration adds, and those
/// created in the database.
#[derive(Debug, Clone)]
pub struct Roles {
    roles: BTreeMap<String, RoleEntry>,
}

impl Default for Roles {
    fn default() -> Self {
        Self {
            roles: BUILT_IN_ROLES
                .iter()
                .map(|(name, permissions, description)| {
                    (
                        name.to_string(),
                        RoleEntry {
                            permissions: Permissions::of(permissions),
                            origin: RoleOrigin::BuiltIn,
                            description: description.to_string(),
                        },
                    )
                })
                .collect(),
        }
    }
}

/// Permission names to a set, or an error naming the role and the unknown permission.
pub(crate) fn parse_permissions(role: &str, names: &[String]) -> Result<Permissions> {
    let permissions = names
        .iter()
        .map(|p| Permission::parse(p))
        .collect::<Result<Vec<_>>>()
        .map_err(|e| match e {
            GatewayError::Invalid { message, .. } => {
                GatewayError::invalid("permissions", format!("role `{role}`: {message}"))
            }
            other => other,
        })?;
    Ok(Permissions::of(&permissions))
}

impl Roles {
    /// The built-in roles and `custom` ones (name → permission names); a custom role may not
    /// redefine a built-in one.
    pub fn with_custom<'a>(
        custom: impl IntoIterator<Item = (&'a str, &'a [String])>,
    ) -> Result<Self> {
        let mut roles = Self::default();
        for (name, permissions) in custom {
            check_name("roles", name)?;
            if roles.roles.contains_key(name) {
                return Err(GatewayError::invalid(
                    "roles",
                    format!("`{name}` is a built-in role and cannot be redefined"),
                ));
            }
            let permissions = parse_permissions(name, permissions).map_err(|e| match e {
                GatewayError::Invalid { message, .. } => GatewayError::invalid("roles", message),
                other => other,
            })?;
            roles.roles.insert(
                name.to_string(),
                RoleEntry {
                    permissions,
                    origin: RoleOrigin::Configured,
                    description: String::new(),
                },
            );
        }
        Ok(roles)
    }

    /// These roles and `stored` ones from the database; a stored role whose name the
    /// configuration took since it was created is left out (the configuration wins).
    pub(crate) fn with_stored(&self, stored: Vec<(String, Permissions, String)>) -> Self {
        let mut roles = self.clone();
        for (name, permissions, description) in stored {
            if roles.roles.contains_key(&name) {
                tracing::warn!(role = %name, "a role in the database has the name of a built-in or configured role; the database's is ignored");
                continue;
            }
            roles.roles.insert(
                name,
                RoleEntry {
                    permissions,
                    origin: RoleOrigin::Stored,
                    description,
                },
            );
        }
        roles
    }

    pub fn permissions(&self, role: &str) -> Option<Permissions> {
        self.roles.get(role).map(|r| r.permissions)
    }

    /// Where `role` is defined, if it exists.
    pub fn origin(&self, role: &str) -> Option<RoleOrigin> {
        self.roles.get(role).map(|r| r.origin)
    }

    /// What `role` is for (empty for configured roles).
    pub fn description(&self, role: &str) -> Option<&str> {
        self.roles.get(role).map(|r| r.description.as_str())
    }

    /// `role`'s permissions, or an error naming the known roles.
    pub fn require(&self, role: &str) -> Result<Permissions> {
        self.permissions(role).ok_or_else(|| {
            GatewayError::invalid(
                "role",
                format!(
                    "unknown role `{role}` (known: {})",
                    self.roles.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            )
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.roles.keys().map(String::as_str)
    }
}

/// Which models a tenant or key may use: glob patterns over served model names
/// (`deepseek-r1-*`, `*`).
#[derive(Debug, Clone)]
pub struct ModelScope {
    patterns: Vec<String>,
    set: GlobSet,
}

impl ModelScope {
    /// Every model.
    pub fn all() -> Self {
        // `*` is always a valid glob.
        Self::new(&["*".to_string()]).unwrap_or_else(|_| Self {
            patterns: Vec::new(),
            set: GlobSet::empty(),
        })
    }

    pub fn new(patterns: &[String]) -> Result<Self> {
        if patterns.is_empty() {
            return Err(GatewayError::invalid(
                "models",
                "give at least one model pattern (`*` for every model)",
            ));
        }
        let mut builder = GlobSetBuilder::new();
        for pattern in patterns {
            if pattern.is_empty() || pattern.len() > 256 || pattern.chars().any(char::is_control) {
                return Err(GatewayError::invalid(
                    "models",
                    format!("`{}` is not a model pattern", pattern.escape_debug()),
                ));
            }
            // `literal_separator` off: `*` also matches across the `/` of Hub-style names.
            let glob = Glob::new(pattern).map_err(|e| {
                GatewayError::invalid("models", format!("`{pattern}` is not a valid glob: {e}"))
            })?;
            builder.add(glob);
        }
        let set = builder
            .build()
            .map_err(|e| GatewayError::invalid("models", e.to_string()))?;
        Ok(Self {
            patterns: patterns.to_vec(),
            set,
        })
    }

    /// Patterns stored one per line.
    pub(crate) fn parse_stored(stored: &str) -> Result<Self> {
        Self::new(&stored.lines().map(str::to_string).collect::<Vec<_>>())
    }

    pub(crate) fn stored(&self) -> String {
        self.patterns.join("\n")
    }

    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    pub fn allows(&self, model: &str) -> bool {
        self.set.is_match(model)
    }

    /// Whether every model name `pattern` matches is matched by one of these patterns. Sound,
    /// not complete: a pattern with character classes or alternatives on this side is only
    /// taken as covering itself, so the answer errs towards "no".
    pub fn covers(&self, pattern: &str) -> bool {
        let wanted = glob_tokens(pattern, true);
        self.patterns.iter().any(|own| {
            own == pattern
                || match glob_tokens(own, false) {
                    Some(own) if own == [GlobToken::Many] => true,
                    Some(own) => wanted.as_ref().is_some_and(|w| glob_within(w, &own)),
                    None => false,
                }
        })
    }
}

/// A glob as what each position matches, for [`ModelScope::covers`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GlobToken {
    Char(char),
    /// Any one character (`?`, or a class such as `[0-9]` on the covered side).
    One,
    /// Any run of characters (`*`, `**`: `/` is not special in model scopes).
    Many,
}

/// `pattern`'s tokens; `None` for what this reading does not model: alternatives (`{a,b}`)
/// anywhere, and classes except on the covered side (`classes`), where one is at most any one
/// character.
fn glob_tokens(pattern: &str, classes: bool) -> Option<Vec<GlobToken>> {
    // globset reads `**/` and `/**/` as "any directories, or none": `**/x` also matches `x`,
    // which a `*` then `/` reading would not see. Wanted patterns with `**` are taken only
    // under an own `*`; an own `**` read as `*` is narrower than it is, which is safe.
    if classes && pattern.contains("**") {
        return None;
    }
    let mut tokens = Vec::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        let token = match c {
            '*' if tokens.last() == Some(&GlobToken::Many) => continue,
            '*' => GlobToken::Many,
            '?' => GlobToken::One,
            '\\' => GlobToken::Char(chars.next()?),
            '[' if classes => {
                // A class matches one character; its first `]` may be a member (`[]a]`).
                let mut first = true;
                loop {
                    match chars.next()? {
                        ']' if !first => break,
                        _ => first = false,
                    }
                }
                GlobToken::One
            }
            '[' | ']' | '{' | '}' => return None,
            c => GlobToken::Char(c),
        };
        tokens.push(token);
    }
    Some(tokens)
}

/// Whether every string `wanted` matches is matched by `own`: `own` must match `wanted` with
/// each of `wanted`'s wildcards standing for itself (a `?` met by `?` or `*`, a `*` only by
/// `*`). Dynamic programming over both positions.
fn glob_within(wanted: &[GlobToken], own: &[GlobToken]) -> bool {
    let (n, m) = (wanted.len(), own.len());
    // within[i][j]: wanted[i..] is covered by own[j..].
    let mut within = vec![vec![false; m + 1]; n + 1];
    within[n][m] = true;
    for j in (0..m).rev() {
        for i in (0..=n).rev() {
            within[i][j] = match own[j] {
                GlobToken::Many => within[i][j + 1] || (i < n && within[i + 1][j]),
                GlobToken::One => i < n && wanted[i] != GlobToken::Many && within[i + 1][j + 1],
                GlobToken::Char(c) => {
                    i < n && wanted[i] == GlobToken::Char(c) && within[i + 1][j + 1]
                }
            };
        }
    }
    within[0][0]
}

/// Names of tenants, roles and keys: a letter or digit, then letters, digits, `-`, `_` or `.`,
/// at most 64 in all — so they read well in logs and never need quoting.
pub(crate) fn check_name(field: &'static str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(GatewayError::invalid(
            field,
            format!(
                "`{}` is not a valid name (a letter or digit, then letters, digits, `-`, `_` or `.`; at most 64)",
                name.escape_debug()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_scopes_match_globs_across_slashes() -> Result<()> {
        let scope = ModelScope::new(&["deepseek-r1-*".into(), "acme/*".into()])?;
        assert!(scope.allows("deepseek-r1-distill-qwen-1.5b"));
        assert!(scope.allows("acme/tuned"));
        assert!(!scope.allows("deepseek-v3"));
        assert!(!scope.allows("gemma-3-270m"));
        assert!(ModelScope::all().allows("deepseek-ai/DeepSeek-R1"));
        assert!(ModelScope::new(&[]).is_err());
        assert!(ModelScope::new(&["a[".into()]).is_err());
        Ok(())
    }

    #[test]
    fn a_scope_covers_only_patterns_within_it() -> Result<()> {
        let scope = ModelScope::new(&["deepseek-r1-*".into(), "gemma-3-?70m".into()])?;
        for within in [
            "deepseek-r1-*",
            "deepseek-r1-distill-*",
            "deepseek-r1-distill-qwen-1.5b",
            "deepseek-r1-*-1.5b",
            "deepseek-r1-?",
            "deepseek-r1-[0-9]*",
            "gemma-3-270m",
            "gemma-3-?70m",
            "gemma-3-[23]70m",
        ] {
            assert!(scope.covers(within), "{within}");
        }
        for beyond in [
            "*",
            "**",
            "deepseek-*",
            "deepseek-r1*",
            "*deepseek-r1-*",
            "?eepseek-r1-x",
            "gemma-3-*70m",
            "gemma-3-??70m",
            "deepseek-r1-{a,b}",
            "nomatch-x",
        ] {
            assert!(!scope.covers(beyond), "{beyond}");
        }
        // `**/` also matches no directory at all: never within a narrower scope.
        for (own, beyond, outside) in [
            ("*/*", "**/*", "llama"),
            ("*/llama", "**/llama", "llama"),
            ("a/*/b", "a/**/b", "a/b"),
        ] {
            let own = ModelScope::new(&[own.into()])?;
            // What makes them broader: a name the own pattern does not allow.
            assert!(
                ModelScope::new(&[beyond.into()])?.allows(outside),
                "{beyond}"
            );
            assert!(!own.allows(outside), "{outside}");
            assert!(!own.covers(beyond), "{beyond}");
        }
        assert!(ModelScope::all().covers("*"));
        assert!(ModelScope::all().covers("anything/at-all"));
        assert!(
            ModelScope::all().covers("a{b,c}"),
            "equal patterns cover each other"
        );
        // Classes on the covering side cover only themselves.
        let classes = ModelScope::new(&["m[0-9]".into()])?;
        assert!(classes.covers("m[0-9]"));
        assert!(!classes.covers("m1"), "sound, not complete");
        assert!(!classes.covers("m?"));
        Ok(())
    }

    #[test]
    fn roles_and_custom_roles() -> Result<()> {
        let roles = Roles::with_custom([("support", &["inference".to_string()][..])])?;
        let support = roles.require("support")?;
        assert!(support.contains(Permission::Inference));
        assert!(!support.contains(Permission::ModelsRead));
        assert_eq!(roles.require("admin")?, Permissions::all());
        assert!(!roles.require("developer")?.contains(Permission::KeysManage));
        assert!(roles.require("root").is_err());
        assert!(Roles::with_custom([("admin", &[][..])]).is_err());
        assert!(Roles::with_custom([("x", &["launch:missiles".to_string()][..])]).is_err());
        Ok(())
    }

    #[test]
    fn names_reject_what_needs_quoting() {
        for good in ["acme", "acme-2", "a.b_c", "A1"] {
            assert!(check_name("tenant", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-acme",
            "acme'; DROP TABLE tenants; --",
            "a b",
            "ü",
            &"a".repeat(65),
        ] {
            assert!(check_name("tenant", bad).is_err(), "{bad}");
        }
    }
}
