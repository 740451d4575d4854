//! `enclave serve`: the OpenAI-compatible HTTP API over the serving engine.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use enclave_engine::{Engine, EngineHandle};
use enclave_gateway::Authenticator;
use enclave_server::{Access, AppState, ServerConfig};

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
    let config = ServerConfig {
        served_model_name: args
            .served_model_name
            .clone()
            .unwrap_or_else(|| default_model_name(&args.model.model)),
        max_body_bytes: bench::parse_size(&args.max_request_body).context("--max-request-body")?,
        reasoning_split: !args.no_reasoning_split,
        shutdown_grace: Duration::from_secs(args.shutdown_timeout),
        max_n: args.max_n.max(1),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("enclave-http")
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(async {
        let access = if auth_enabled {
            let store = settings.store().await?;
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
            Access::Keys(Arc::new(Authenticator::new(store, roles)))
        } else {
            eprintln!(
                "WARNING: authentication is off; any local process may use every model and route"
            );
            tracing::warn!("authentication disabled");
            Access::Disabled
        };
        serve(args, config, access).await
    });
    // A model still loading when a signal arrived must not hold the exit.
    runtime.shutdown_background();
    result
}

async fn serve(args: ServeArgs, config: ServerConfig, access: Access) -> Result<()> {
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    let address = listener.local_addr().context("listening address")?;
    let name = config.served_model_name.clone();
    eprintln!("listening on http://{address} (loading {name}; /health answers 503 until ready)");
    let state = AppState::new(config, access);
    let mut server = tokio::spawn(enclave_server::serve(
        listener,
        state.clone(),
        enclave_server::shutdown_signal(),
    ));

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
    eprintln!("ready: serving {name} at http://{address}/v1");
    let result = server.await.context("server task");
    if let Some(engine) = state.engine() {
        engine.shutdown();
    }
    result??;
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

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
