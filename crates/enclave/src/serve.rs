//! `enclave serve`: the OpenAI-compatible HTTP API over the serving engine.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use enclave_engine::{Engine, EngineHandle};
use enclave_gateway::{Authenticator, ClientAuth, TlsSettings};
use enclave_server::{Access, AppState, ServerConfig, TlsConfigHandle, TlsListener};

use crate::config::Settings;
use crate::{bench, model_source, ModelArgs, ServingArgs};

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub serving: ServingArgs,

    /// The model name clients send and see (default: the model folder's name or the Hub id).
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,

    /// Address to listen on (`0.0.0.0` for every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,

    /// Port to listen on (0 picks a free one; the chosen address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,

    /// Largest request body accepted; larger ones get HTTP 413.
    #[arg(long, value_name = "SIZE", default_value = "8MiB")]
    pub max_request_body: String,

    /// Return a reasoning model's `<think>` text inside `content` instead of splitting it
    /// into `reasoning_content`.
    #[arg(long)]
    pub no_reasoning_split: bool,

    /// Most choices (`n`) one request may ask for.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub max_n: usize,

    /// Seconds requests in flight may take to finish after SIGTERM or SIGINT.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub shutdown_timeout: u64,

    /// PEM certificate chain for HTTPS (with --tls-key); TLS 1.3 only unless `tls.allow_tls12`.
    /// Reloaded from the files on SIGHUP.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// PEM bundle of CAs whose client certificates are accepted (mTLS); a client's subject
    /// becomes its identity (`[[tls.client_identities]]` binds it to a role).
    #[arg(long, value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,

    /// With --tls-client-ca: refuse clients without a certificate (`required`, the default)
    /// or let them authenticate with a key instead (`optional`).
    #[arg(long, value_name = "MODE")]
    pub tls_client_auth: Option<String>,

    /// Address of the admin listener (the management API: tenants, keys, usage); put it on
    /// a management network. Default 127.0.0.1.
    #[arg(long, value_name = "HOST")]
    pub admin_host: Option<String>,

    /// Port of the admin listener; without one (here or `admin.port`) there is none.
    #[arg(long, value_name = "PORT")]
    pub admin_port: Option<u16>,

    /// With --tls-client-ca: client certificates on the admin listener, `required` or
    /// `optional` (default: as --tls-client-auth).
    #[arg(long, value_name = "MODE")]
    pub admin_tls_client_auth: Option<String>,

    /// Serve without authentication (every caller may do everything). Refused unless --host
    /// is a loopback address; the same as `auth.enabled = false` in the configuration.
    #[arg(long)]
    pub no_auth: bool,
}

pub fn run(args: ServeArgs, settings: &Settings) -> Result<()> {
    args.serving.config()?;
    let auth_enabled = settings.auth_enabled() && !args.no_auth;
    if !auth_enabled && !is_loopback(&args.host) {
        anyhow::bail!(
            "authentication is off (--no-auth or auth.enabled = false), so Enclave listens only \
             on loopback addresses, not on {}; create API keys (`enclave keys create`) to serve \
             other machines",
            args.host
        );
    }
    let roles = settings.roles()?;
    let retention = settings.audit.retention()?;
    let tls = tls_settings(&args, settings)?;
    let admin_tls = match &tls {
        Some(api) => Some(admin_tls_settings(&args, settings, api)?),
        None => None,
    };
    let admin = args.admin_port.or(settings.admin.port).map(|port| {
        let host = args
            .admin_host
            .clone()
            .or_else(|| settings.admin.host.clone())
            .unwrap_or_else(|| "127.0.0.1".into());
        (host, port)
    });
    if admin.is_some() && !auth_enabled {
        anyhow::bail!(
            "the admin listener needs authentication: drop --no-auth (auth.enabled = false)"
        );
    }
    let config = ServerConfig {
        served_model_name: args
            .served_model_name
            .clone()
            .unwrap_or_else(|| default_model_name(&args.model.model)),
        max_body_bytes: bench::parse_size(&args.max_request_body).context("--max-request-body")?,
        reasoning_split: !args.no_reasoning_split,
        shutdown_grace: Duration::from_secs(args.shutdown_timeout),
        max_n: args.max_n.max(1),
        abuse: settings.abuse.limits()?,
        redaction: settings.redaction.policies()?.map(Arc::new),
        connections: fit_open_files(settings.connections.limits()?),
        audit_queue: settings.audit.queue()?,
        tenant_shares: settings.scheduling.tenant_shares()?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("enclave-http")
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(async {
        let mut usage_store = None;
        let access = if auth_enabled {
            let store = settings.store().await?;
            usage_store = Some(store.clone());
            let active = store
                .keys(None)
                .await?
                .iter()
                .filter(|k| k.revoked_at.is_none())
                .count();
            if active == 0 {
                eprintln!(
                    "no API keys yet: every request will get 401 until you create one \
                     (`enclave keys create --role developer`)"
                );
            }
            let mut authenticator = Authenticator::new(store, roles)
                .with_certificates(settings.certificate_bindings()?)
                .map_err(|e| anyhow::anyhow!("tls.client_identities: {e}"))?;
            if let Some(oidc) = settings.oidc.settings()? {
                let issuer = oidc.issuer.clone();
                let verifier = enclave_gateway::OidcVerifier::new(oidc)?;
                let keys = verifier.load_keys().await?;
                eprintln!("OIDC: tokens of {issuer} ({keys} signing keys)");
                authenticator = authenticator.with_oidc(verifier);
            }
            Access::Keys(Arc::new(authenticator))
        } else {
            eprintln!(
                "WARNING: authentication is off; any local process may use every model and route"
            );
            tracing::warn!("authentication disabled");
            Access::Disabled
        };
        serve(
            args,
            config,
            access,
            usage_store,
            tls,
            admin,
            admin_tls,
            retention,
        )
        .await
    });
    // A model still loading when a signal arrived must not hold the exit.
    runtime.shutdown_background();
    result
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    args: ServeArgs,
    config: ServerConfig,
    access: Access,
    usage_store: Option<enclave_gateway::Store>,
    tls: Option<TlsSettings>,
    admin: Option<(String, u16)>,
    admin_tls: Option<TlsSettings>,
    (retention_days, admin_retention_days): (u32, u32),
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    let address = listener.local_addr().context("listening address")?;
    let name = config.served_model_name.clone();
    let scheme = if tls.is_some() { "https" } else { "http" };
    eprintln!(
        "listening on {scheme}://{address} (loading {name}; /health answers 503 until ready)"
    );
    warn_if_plain_and_exposed("the API", tls.is_none(), address);
    let state = AppState::new(config, access);
    // Each listener has its TLS configuration; a SIGHUP reloads them all.
    let tls_handle = match &tls {
        Some(tls) => {
            let handle = TlsConfigHandle::new(tls.server_config()?);
            reload_on_sighup(tls.clone(), handle.clone());
            Some(handle)
        }
        None => None,
    };
    if let Some((host, port)) = admin {
        let admin_listener = tokio::net::TcpListener::bind((host.as_str(), port))
            .await
            .with_context(|| format!("cannot listen on {host}:{port} (admin)"))?;
        let admin_address = admin_listener.local_addr().context("admin address")?;
        eprintln!("admin API on {scheme}://{admin_address}/admin/v1");
        warn_if_plain_and_exposed("the admin API", admin_tls.is_none(), admin_address);
        let admin_state = state.clone();
        let admin_tls = match admin_tls {
            Some(tls) => {
                let handle = TlsConfigHandle::new(tls.server_config()?);
                reload_on_sighup(tls, handle.clone());
                Some(handle)
            }
            None => None,
        };
        tokio::spawn(async move {
            let served = match admin_tls {
                None => {
                    enclave_server::serve_admin(
                        admin_listener,
                        admin_state,
                        enclave_server::shutdown_signal(),
                    )
                    .await
                }
                Some(handle) => match TlsListener::new(admin_listener, handle) {
                    Ok(listener) => {
                        enclave_server::serve_admin_tls(
                            listener,
                            admin_state,
                            enclave_server::shutdown_signal(),
                        )
                        .await
                    }
                    Err(e) => Err(e),
                },
            };
            if let Err(e) = served {
                tracing::error!(error = %e, "the admin listener stopped");
            }
        });
    }
    // The audit log keeps what its retention says: pruned at start and then hourly.
    if let Some(store) = usage_store.clone() {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(AUDIT_PRUNE_INTERVAL);
            loop {
                tick.tick().await;
                let now = enclave_gateway::unix_millis();
                match store
                    .prune_audit(
                        now - i64::from(retention_days) * 86_400_000,
                        now - i64::from(admin_retention_days) * 86_400_000,
                        now,
                        "system",
                    )
                    .await
                {
                    Ok(report) if report.pruned > 0 => {
                        tracing::info!(
                            pruned = report.pruned,
                            deleted = report.deleted,
                            "audit records past their retention pruned"
                        );
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot prune the audit log"),
                }
            }
        });
    }
    // Usage is counted in memory and added to the database every few seconds.
    if let Some(store) = usage_store.clone() {
        let ledger = state.usage_ledger().clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(USAGE_FLUSH_INTERVAL);
            loop {
                tick.tick().await;
                if let Err(e) = ledger.flush(&store).await {
                    tracing::warn!(error = %e, "cannot write usage; kept for the next try");
                }
            }
        });
    }
    let mut server = match tls_handle {
        None => tokio::spawn(enclave_server::serve(
            listener,
            state.clone(),
            enclave_server::shutdown_signal(),
        )),
        Some(handle) => tokio::spawn(enclave_server::serve_tls(
            TlsListener::new(listener, handle).context("TLS listener")?,
            state.clone(),
            enclave_server::shutdown_signal(),
        )),
    };

    let loading = {
        let model = args.model.clone();
        let serving = args.serving.clone();
        tokio::task::spawn_blocking(move || -> Result<EngineHandle> {
            let dir = model_source::resolve(&model.model, &model.revision)?;
            let engine = Engine::load(&dir, &model.engine_config())?;
            eprintln!("{}", engine.summary());
            // Computed after the weights load, so a percentage counts what they left.
            Ok(EngineHandle::start(engine, serving.config()?)?)
        })
    };
    let handle = tokio::select! {
        loaded = loading => loaded.context("model loading stopped")??,
        finished = &mut server => {
            finished.context("server task")??;
            return Ok(()); // a signal before the model was ready
        }
    };
    state
        .warm_up_and_serve(handle)
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    eprintln!("ready: serving {name} at {scheme}://{address}/v1");
    let result = server.await.context("server task");
    if let Some(engine) = state.engine() {
        engine.shutdown();
    }
    if let Some(store) = usage_store {
        if let Err(e) = state.usage_ledger().flush(&store).await {
            tracing::warn!(error = %e, "usage since the last flush could not be written");
        }
    }
    if let Some(audit) = state.audit_log() {
        // Every queued record is written before exiting, however long the database takes
        // (the queue is bounded, so this is bounded by its size); only a kill cuts it short.
        let flushed = audit.flush();
        tokio::pin!(flushed);
        loop {
            match tokio::time::timeout(AUDIT_FLUSH_PROGRESS, &mut flushed).await {
                Ok(Ok(())) => break,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "the audit log could not be flushed");
                    break;
                }
                Err(_) => tracing::warn!(
                    queued = audit.stats().depth,
                    "still writing the audit log's queued records before exiting"
                ),
            }
        }
    }
    result??;
    Ok(())
}

/// How often the audit log is pruned to its retention.
const AUDIT_PRUNE_INTERVAL: Duration = Duration::from_secs(3600);
/// How often exiting reports that queued audit records are still being written.
const AUDIT_FLUSH_PROGRESS: Duration = Duration::from_secs(10);

/// How often counted usage is written to the database (what a crash can lose).
const USAGE_FLUSH_INTERVAL: Duration = Duration::from_secs(5);

/// The listener's TLS settings from the flags over `[tls]`; `None` for plain HTTP.
fn tls_settings(args: &ServeArgs, settings: &Settings) -> Result<Option<TlsSettings>> {
    let file = &settings.tls;
    let cert = args.tls_cert.clone().or_else(|| file.cert.clone());
    let key = args.tls_key.clone().or_else(|| file.key.clone());
    let client_ca = args
        .tls_client_ca
        .clone()
        .or_else(|| file.client_ca.clone());
    let (cert, key) = match (cert, key) {
        (Some(cert), Some(key)) => (cert, key),
        (None, None) if client_ca.is_none() => return Ok(None),
        _ => anyhow::bail!("TLS needs both --tls-cert and --tls-key (tls.cert and tls.key)"),
    };
    let client_auth = client_auth(
        args.tls_client_auth
            .as_deref()
            .or(file.client_auth.as_deref()),
        "--tls-client-auth (tls.client_auth)",
    )?;
    if file.client_crl.is_some() && client_ca.is_none() {
        anyhow::bail!("tls.client_crl needs a client CA (--tls-client-ca or tls.client_ca)");
    }
    let tls = TlsSettings {
        cert,
        key,
        client_ca,
        client_auth,
        client_crl: file.client_crl.clone(),
        allow_tls12: file.allow_tls12.unwrap_or(false),
    };
    // Checked now, so a bad file stops the start with its name.
    tls.server_config()?;
    Ok(Some(tls))
}

fn client_auth(mode: Option<&str>, name: &str) -> Result<ClientAuth> {
    match mode.unwrap_or("required") {
        "required" => Ok(ClientAuth::Required),
        "optional" => Ok(ClientAuth::Optional),
        other => anyhow::bail!("{name}: `{other}` is not `required` or `optional`"),
    }
}

/// The admin listener's TLS: the API listener's, with its own client-certificate policy
/// when one is set.
fn admin_tls_settings(
    args: &ServeArgs,
    settings: &Settings,
    api: &TlsSettings,
) -> Result<TlsSettings> {
    let mode = args
        .admin_tls_client_auth
        .as_deref()
        .or(settings.admin.client_auth.as_deref());
    let mut tls = api.clone();
    if mode.is_some() {
        tls.client_auth = client_auth(mode, "--admin-tls-client-auth (admin.client_auth)")?;
    }
    tls.server_config()?;
    Ok(tls)
}

/// On SIGHUP, reads the certificate files again; a failure keeps the current ones.
fn reload_on_sighup(tls: TlsSettings, handle: TlsConfigHandle) {
    #[cfg(unix)]
    tokio::spawn(async move {
        let Ok(mut hangups) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::warn!("cannot listen for SIGHUP: certificates will not reload");
            return;
        };
        while hangups.recv().await.is_some() {
            match tls.server_config() {
                Ok(config) => {
                    handle.replace(config);
                    eprintln!(
                        "SIGHUP: TLS certificate reloaded from {}",
                        tls.cert.display()
                    );
                }
                Err(e) => eprintln!(
                    "SIGHUP: TLS certificate not reloaded (still serving the old one): {e}"
                ),
            }
        }
    });
    #[cfg(not(unix))]
    let _ = (tls, handle);
}

/// Whether `host` names only this machine (`127.0.0.1`, `::1`, `localhost`).
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The folder name of a local model, or the Hub id as given.
fn default_model_name(model: &str) -> String {
    let path = Path::new(model);
    if path.exists() {
        if let Some(name) = path
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        {
            return name;
        }
    }
    model.to_string()
}

/// Keys and prompts sent in clear text beyond this machine: said at start, on stderr and in
/// the log, so nobody runs it so by accident.
fn warn_if_plain_and_exposed(what: &str, plain: bool, address: std::net::SocketAddr) {
    if plain && !address.ip().is_loopback() {
        eprintln!(
            "warning: {what} serves plain HTTP on {address}, a non-loopback address: API keys \
             and prompts cross the network unencrypted; use --tls-cert/--tls-key, or a \
             TLS-terminating proxy on the same host"
        );
        tracing::warn!(%address, "{what} serves plain HTTP on a non-loopback address");
    }
}

/// Raises the soft open-file limit to the hard one (each connection is a descriptor, and the
/// usual soft 1024 is exhausted by a thousand idle sockets), and keeps the connection cap
/// under it with room for the model's files, the database and the admin listener.
fn fit_open_files(
    mut limits: enclave_server::ConnectionLimits,
) -> enclave_server::ConnectionLimits {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let soft = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!(error = %e, soft, hard, "cannot raise the open-file limit");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-file limit");
            return limits;
        }
    };
    // Two listeners (the API's and the admin one) share the descriptors.
    let room = usize::try_from(soft.saturating_sub(256) / 2)
        .unwrap_or(usize::MAX)
        .max(64);
    if limits.max_connections > room {
        tracing::warn!(
            max_connections = limits.max_connections,
            open_files = soft,
            "the open-file limit allows fewer connections than configured; capping at {room}"
        );
        limits.max_connections = room;
    }
    limits
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_listener_may_have_its_own_client_certificate_policy() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
        std::fs::write(path("cert.pem"), cert.pem()).unwrap();
        std::fs::write(path("key.pem"), key.serialize_pem()).unwrap();
        std::fs::write(path("ca.pem"), cert.pem()).unwrap();
        let args = |extra: &[&str]| {
            let mut argv = vec!["serve".to_string(), "--model".into(), "m".into()];
            for (flag, file) in [
                ("--tls-cert", "cert.pem"),
                ("--tls-key", "key.pem"),
                ("--tls-client-ca", "ca.pem"),
            ] {
                argv.push(flag.into());
                argv.push(path(file));
            }
            argv.extend(extra.iter().map(|s| s.to_string()));
            Cli::parse_from(argv).serve
        };
        let settings = Settings::default();
        let serve = args(&["--tls-client-auth", "optional"]);
        let api = tls_settings(&serve, &settings).unwrap().unwrap();
        assert_eq!(api.client_auth, ClientAuth::Optional);
        assert_eq!(
            admin_tls_settings(&serve, &settings, &api)
                .unwrap()
                .client_auth,
            ClientAuth::Optional
        );
        let serve = args(&[
            "--tls-client-auth",
            "optional",
            "--admin-tls-client-auth",
            "required",
        ]);
        assert_eq!(
            admin_tls_settings(&serve, &settings, &api)
                .unwrap()
                .client_auth,
            ClientAuth::Required
        );
        let serve = args(&["--admin-tls-client-auth", "sometimes"]);
        assert!(admin_tls_settings(&serve, &settings, &api).is_err());
    }

    #[test]
    fn loopback_hosts() {
        for host in [
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "[::1]",
            "localhost",
            "LOCALHOST",
        ] {
            assert!(is_loopback(host), "{host}");
        }
        for host in [
            "0.0.0.0",
            "::",
            "10.0.0.1",
            "example.com",
            "localhost.example.com",
            "",
        ] {
            assert!(!is_loopback(host), "{host}");
        }
    }
}
