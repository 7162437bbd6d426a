//! aistack-exporter: parse flags, load config, start the collectors, serve until SIGTERM.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use aistack_common::config::{self, ConfigError};
use aistack_common::{logging, server};
use aistack_exporter::cli::{Cli, Command};
use aistack_exporter::config::{Config, DEFAULT_CONFIG_PATH};
use aistack_exporter::http::app;
use aistack_exporter::{Exporter, Roots};
use anyhow::Context as _;

fn main() -> ExitCode {
    let cli = match Cli::try_parse_args(std::env::args_os()) {
        Ok(cli) => cli,
        Err(err) => err.exit(),
    };
    logging::init(cli.common.log_level, cli.common.log_format);
    let config_path = config::resolve_path(
        cli.common.config_file.as_deref(),
        Path::new(DEFAULT_CONFIG_PATH),
    );
    match cli.command {
        Some(Command::CheckConfig) => check_config(config_path.as_deref()),
        Some(Command::Healthcheck) => {
            aistack_common::healthcheck::run("aistack-exporter", &cli.listen_address)
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

fn check_config(path: Option<&Path>) -> ExitCode {
    config::report_check(path, DEFAULT_CONFIG_PATH, config::load::<Config>(path))
}

fn run(cli: &Cli, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let config: Config = config::load(config_path.as_deref()).map_err(|err| match err {
        ConfigError::Invalid { .. } => anyhow::anyhow!("{err}"),
        ConfigError::Read { .. } => anyhow::Error::new(err),
    })?;
    match &config_path {
        Some(path) => tracing::info!(path = %path.display(), "loaded config"),
        None => tracing::info!("no config file, using built-in defaults"),
    }
    // Sampling and serving are light: two workers serve a scrape while another is encoded, and
    // keep memory flat on many-core hosts.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        tracing::info!(
            version = aistack_common::LONG_VERSION,
            "starting aistack-exporter"
        );
        let roots = Roots {
            procfs: cli.procfs.clone(),
            sysfs: cli.sysfs.clone(),
        };
        let exporter = Exporter::start(&config, &roots, |kind| {
            config.enabled(kind, cli.collector_flag(kind))
        })
        .context("starting the collectors")?;
        let limits = server::prepare(cli.common.connection_limits());
        let listener = server::bind(&cli.listen_address)
            .await
            .with_context(|| format!("listening on {}", cli.listen_address))?;
        server::serve(
            listener,
            app(exporter.app_state(&cli.telemetry_path)),
            limits,
        )
        .await?;
        drop(exporter);
        Ok(())
    })
}
