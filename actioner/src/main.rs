//! aistack-actioner: parse flags, load and check config, serve until SIGTERM.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use aistack_actioner::auth::Auth;
use aistack_actioner::cli::{Cli, Command};
use aistack_actioner::config::{Config, DEFAULT_CONFIG_PATH};
use aistack_actioner::fence::Fence;
use aistack_actioner::ha::{self, Elector, HaConfig};
use aistack_actioner::{Actioner, build_actions, build_actions_fenced, check_files};
use aistack_common::config::{self, ConfigError};
use aistack_common::{logging, server};
use anyhow::Context as _;
use clap::Parser as _;
use std::sync::Arc;

use tokio::sync::watch;

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.common.log_level, cli.common.log_format);
    let config_path = config::resolve_path(
        cli.common.config_file.as_deref(),
        Path::new(DEFAULT_CONFIG_PATH),
    );
    match cli.command {
        Some(Command::CheckConfig) => check_config(config_path.as_deref()),
        Some(Command::Healthcheck) => {
            aistack_common::healthcheck::run("aistack-actioner", &cli.listen_address)
        }
        None => match run(&cli, config_path) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                tracing::error!(error = format!("{err:#}"), "exiting");
                ExitCode::FAILURE
            }
        },
    }
}

/// Loads the config and checks its secret files.
fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
    let config: Config = config::load(path)?;
    check_files(&config, path.unwrap_or(Path::new("<built-in defaults>")))?;
    Ok(config)
}

fn check_config(path: Option<&Path>) -> ExitCode {
    config::report_check(path, DEFAULT_CONFIG_PATH, load(path))
}

fn run(cli: &Cli, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let config = load(config_path.as_deref()).map_err(|err| anyhow::anyhow!("{err}"))?;
    tracing::info!(
        config = %config_path.as_deref().map_or("<built-in defaults>".into(), |p| p.display().to_string()),
        host = %config.host_name(),
        rules = config.rules.len(),
        dry_run = config.dry_run,
        "loaded config"
    );
    aistack_actioner::prerequisites::announce(&config);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        tracing::info!(
            version = aistack_common::LONG_VERSION,
            "starting aistack-actioner"
        );
        let limits = server::prepare(cli.common.connection_limits());
        let auth = Auth::load(&config).context("reading the secret files")?;
        let listener = server::bind(&cli.listen_address)
            .await
            .with_context(|| format!("listening on {}", cli.listen_address))?;
        match &config.ha {
            None => {
                let actions = build_actions(&config)?;
                let actioner = Actioner::start(&config, auth, actions)?;
                server::serve(listener, actioner.router, limits).await?;
            }
            Some(ha) => run_ha(&config, ha, auth, listener, limits).await?,
        }
        Ok(())
    })
}

/// With `ha:`: serve as a follower (forwarding to the leader) until this replica holds the
/// lease, then open the journal and act; exit at once when the lease may be lost (the next
/// leader reads the same journal), give it up at a clean stop.
async fn run_ha(
    config: &Config,
    ha: &HaConfig,
    auth: Auth,
    listener: tokio::net::TcpListener,
    limits: server::ConnectionLimits,
) -> anyhow::Result<()> {
    let (namespace, name) = ha.lease().context("ha.lease")?;
    let advertise = advertise_url(&listener);
    let elector = Elector::connect(
        namespace,
        name,
        ha::identity(),
        ha.timing(),
        advertise.clone(),
    )
    .await
    .map_err(|e| anyhow::anyhow!(e))?;
    tracing::info!(lease = %ha.lease, identity = %elector.identity(), advertise = advertise.as_deref().unwrap_or("none (set POD_IP)"), "high availability: acting only while holding the lease");
    let follower = ha::follower_router(
        &ha.lease,
        elector.leader_url(),
        config.limits.max_body_bytes,
    );
    let (router_tx, router_rx) = watch::channel(follower);
    let server = tokio::spawn(server::serve(
        listener,
        ha::switching_router(router_rx),
        limits,
    ));
    let elector = Arc::new(tokio::sync::Mutex::new(elector));
    let holding = std::sync::OnceLock::<tokio::task::AbortHandle>::new();
    let leading = async {
        let won = elector.lock().await.wait_for_leadership().await;
        // Nothing is written past the renew deadline, should this process freeze and miss it.
        let won_boot = aistack_actioner::fence::now().saturating_sub(won.elapsed());
        let fence = Fence::until(won_boot + ha.timing().renew_deadline);
        // Renewing from now on, also while the journal is read back.
        let hold = tokio::spawn(ha::hold(elector.clone(), won, fence.clone()));
        let _ = holding.set(hold.abort_handle());
        tracing::info!(lease = %ha.lease, "leading: reading the journal back");
        let actions = build_actions_fenced(config, &fence)?;
        let actioner = Actioner::start_fenced(config, auth, actions, fence)?;
        if !hold.is_finished() {
            // The follower router goes; from now on requests reach the actioner.
            drop(router_tx.send_replace(actioner.router.clone()));
        }
        let why = hold.await.context("the lease task")?;
        drop(actioner);
        anyhow::Ok(why)
    };
    let outcome = tokio::select! {
        served = server => Served::Stopped(served),
        lost = leading => Served::Lost(lost),
    };
    if let Served::Lost(Ok(why)) = &outcome {
        // Nothing may act past this point: no unwinding, no waiting for running actions.
        tracing::error!(lease = %ha.lease, "{why}: stopping at once, so that only the leader acts");
        std::process::exit(1);
    }
    if let Some(hold) = holding.get() {
        hold.abort();
    }
    let release = async { elector.lock().await.release().await };
    let released = tokio::time::timeout(std::time::Duration::from_secs(2), release).await;
    match &released {
        Ok(Ok(())) => {}
        Ok(Err(err)) => {
            tracing::warn!(error = %err, "could not give the lease up; another replica takes it over when it expires")
        }
        Err(_) => tracing::warn!(
            "giving the lease up timed out; another replica takes it over when it expires"
        ),
    }
    match outcome {
        Served::Stopped(served) => {
            served.context("the server task")??;
            // Once given up, another replica may lead at its next round: nothing of this one
            // (a run still going, a journal write on a blocking thread) may go on past here.
            if matches!(released, Ok(Ok(()))) {
                tracing::info!(lease = %ha.lease, "gave the lease up; stopping");
                std::process::exit(0);
            }
            Ok(())
        }
        Served::Lost(Ok(_)) => unreachable!("exited above"),
        Served::Lost(Err(err)) => Err(err),
    }
}

/// Where the other replicas reach this one: `http://$POD_IP:PORT` in a pod, else the address
/// it listens on when that is a specific one (not 0.0.0.0 or ::).
fn advertise_url(listener: &tokio::net::TcpListener) -> Option<String> {
    let local = listener.local_addr().ok()?;
    let ip = match std::env::var("POD_IP").ok().filter(|ip| !ip.is_empty()) {
        Some(ip) => ip.parse().ok()?,
        None if local.ip().is_unspecified() => return None,
        None => local.ip(),
    };
    Some(format!(
        "http://{}",
        std::net::SocketAddr::new(ip, local.port())
    ))
}

enum Served {
    Stopped(Result<std::io::Result<()>, tokio::task::JoinError>),
    Lost(anyhow::Result<String>),
}
