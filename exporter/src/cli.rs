//! Command-line flags, in node_exporter's style, with `--collector.<name>` and
//! `--no-collector.<name>` for every collector.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;

use aistack_common::api::{GPU_PATH, IDLE_PATH};
use aistack_common::cli::{CommonArgs, ListenAddress};
use clap::{Arg, ArgAction, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::collectors::CollectorKind;

/// aistack-exporter: GPU, CPU, power, idle and service-health metrics for LLM inference hosts.
#[derive(Debug, Clone, Parser)]
#[command(name = "aistack-exporter", version = aistack_common::LONG_VERSION)]
pub struct Cli {
    /// Flags both aistack binaries take.
    #[command(flatten)]
    pub common: CommonArgs,

    /// Address to listen on for HTTP requests; ":PORT" listens on every interface.
    #[arg(
        long = "web.listen-address",
        value_name = "ADDRESS",
        default_value = ":9470",
        global = true
    )]
    pub listen_address: ListenAddress,

    /// Path under which to expose metrics.
    #[arg(long = "web.telemetry-path", value_name = "PATH", default_value = "/metrics", value_parser = parse_telemetry_path)]
    pub telemetry_path: String,

    /// procfs mountpoint.
    #[arg(long = "path.procfs", value_name = "PATH", default_value = "/proc")]
    pub procfs: PathBuf,

    /// sysfs mountpoint.
    #[arg(long = "path.sysfs", value_name = "PATH", default_value = "/sys")]
    pub sysfs: PathBuf,

    /// What to do instead of serving metrics.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// `--collector.<name>` (true) or `--no-collector.<name>` (false), the last one given wins.
    #[arg(skip)]
    pub collector_flags: BTreeMap<CollectorKind, bool>,
}

/// Subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Validate the config file and exit: 0 when valid, 1 with one line per problem.
    CheckConfig,
    /// Ask the running instance at --web.listen-address (every interface: loopback) for
    /// /healthz and exit: 0 when it answers 200 within 2 s, 1 with one line saying why. For
    /// container health checks.
    Healthcheck,
}

fn parse_telemetry_path(path: &str) -> Result<String, String> {
    // The router takes `{name}` as a capture and refuses segments starting with `:` or `*`: a
    // literal path only, so no flag can make the router panic at start.
    let pattern = path.contains(['{', '}'])
        || path
            .split('/')
            .any(|segment| segment.starts_with([':', '*']));
    match path {
        p if !p.starts_with('/') => Err("must start with '/'".into()),
        "/" | "/healthz" | IDLE_PATH | GPU_PATH => {
            Err(format!("{path} is taken by another endpoint"))
        }
        _ if pattern => {
            Err("must be a plain path, without '{', '}', or ':' and '*' starting a segment".into())
        }
        p => Ok(p.to_owned()),
    }
}

impl Cli {
    /// Parses the command line; `Err` carries clap's message and exit code (help, version,
    /// usage errors).
    pub fn try_parse_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let mut command = Self::command();
        for kind in CollectorKind::ALL {
            let (on, off) = (format!("collector.{kind}"), format!("no-collector.{kind}"));
            let default = if kind.enabled_by_default() {
                "enabled"
            } else {
                "disabled"
            };
            command = command
                .arg(
                    Arg::new(on.clone())
                        .long(on.clone())
                        .action(ArgAction::SetTrue)
                        .overrides_with(off.clone())
                        .help(format!(
                            "Enable the {kind} collector: {} (default: {default})",
                            kind.description()
                        )),
                )
                .arg(
                    Arg::new(off.clone())
                        .long(off)
                        .action(ArgAction::SetTrue)
                        .overrides_with(on)
                        .help(format!("Disable the {kind} collector")),
                );
        }
        let matches = command.try_get_matches_from(args)?;
        let mut cli = Self::from_arg_matches(&matches)?;
        for kind in CollectorKind::ALL {
            if matches.get_flag(&format!("collector.{kind}")) {
                cli.collector_flags.insert(kind, true);
            } else if matches.get_flag(&format!("no-collector.{kind}")) {
                cli.collector_flags.insert(kind, false);
            }
        }
        Ok(cli)
    }

    /// The command-line override for `kind`, if any.
    pub fn collector_flag(&self, kind: CollectorKind) -> Option<bool> {
        self.collector_flags.get(&kind).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_args(std::iter::once("aistack-exporter").chain(args.iter().copied()))
    }

    #[test]
    fn defaults() {
        let cli = parse(&[]).unwrap();
        assert_eq!(cli.listen_address.to_string(), ":9470");
        assert_eq!(cli.telemetry_path, "/metrics");
        assert_eq!(cli.procfs, PathBuf::from("/proc"));
        assert!(cli.collector_flags.is_empty());
        assert!(cli.command.is_none());
    }

    #[test]
    fn collector_flags_last_one_wins() {
        let cli = parse(&[
            "--no-collector.hwmon",
            "--collector.cpu",
            "--no-collector.cpu",
        ])
        .unwrap();
        assert_eq!(cli.collector_flag(CollectorKind::Hwmon), Some(false));
        assert_eq!(cli.collector_flag(CollectorKind::Cpu), Some(false));
        assert_eq!(cli.collector_flag(CollectorKind::Rapl), None);
        let cli = parse(&["--no-collector.cpu", "--collector.cpu"]).unwrap();
        assert_eq!(cli.collector_flag(CollectorKind::Cpu), Some(true));
    }

    #[test]
    fn check_config_takes_the_config_flag_on_either_side() {
        let cli = parse(&["check-config", "--config.file", "/x.yaml"]).unwrap();
        assert!(matches!(cli.command, Some(Command::CheckConfig)));
        assert_eq!(cli.common.config_file, Some(PathBuf::from("/x.yaml")));
        let cli = parse(&["--config.file=/y.yaml", "check-config"]).unwrap();
        assert_eq!(cli.common.config_file, Some(PathBuf::from("/y.yaml")));
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        assert!(parse(&["--collector.gpux"]).is_err());
        assert!(parse(&["--web.telemetry-path", "metrics"]).is_err());
        for taken in ["/", "/healthz", "/api/v1/idle", "/api/v1/gpu"] {
            assert!(parse(&["--web.telemetry-path", taken]).is_err(), "{taken}");
        }
        for pattern in ["/{x}", "/metrics}", "/:x", "/a/*rest"] {
            assert!(
                parse(&["--web.telemetry-path", pattern]).is_err(),
                "{pattern}"
            );
        }
        assert_eq!(
            parse(&["--web.telemetry-path", "/prom/metrics:v1"])
                .unwrap()
                .telemetry_path,
            "/prom/metrics:v1"
        );
        assert!(parse(&["--log.level", "loud"]).is_err());
        assert!(parse(&["--web.listen-address", "9470"]).is_err());
    }
}
