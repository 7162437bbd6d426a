//! Command-line flags, in node_exporter's style.

use aistack_common::cli::{CommonArgs, ListenAddress};
use clap::{Parser, Subcommand};

/// aistack-actioner: receives Alertmanager webhooks and acts on GPU hosts, safely.
#[derive(Debug, Clone, Parser)]
#[command(name = "aistack-actioner", version = aistack_common::LONG_VERSION)]
pub struct Cli {
    /// Flags both aistack binaries take.
    #[command(flatten)]
    pub common: CommonArgs,

    /// Address to listen on for HTTP requests; ":PORT" listens on every interface.
    #[arg(
        long = "web.listen-address",
        value_name = "ADDRESS",
        default_value = ":9471",
        global = true
    )]
    pub listen_address: ListenAddress,

    /// What to do instead of serving.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Validate the config file (and the secret files it names) and exit: 0 when valid, 1 with
    /// one line per problem.
    CheckConfig,
    /// Ask the running instance at --web.listen-address (every interface: loopback) for
    /// /healthz and exit: 0 when it answers 200 within 2 s, 1 with one line saying why. For
    /// container health checks.
    Healthcheck,
}
