//! Flags both binaries take, in node_exporter's style (`--log.level`, `--config.file`, ...).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, ValueEnum};

/// Flags shared by every aistack binary; flatten into the binary's own `Cli`.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// YAML config file. Without it, the binary's default path is used when that file exists,
    /// and built-in defaults otherwise.
    #[arg(long = "config.file", value_name = "PATH", global = true)]
    pub config_file: Option<PathBuf>,

    /// Only log messages with the given severity or above.
    #[arg(long = "log.level", value_enum, default_value_t = LogLevel::Info, global = true)]
    pub log_level: LogLevel,

    /// Output format of log messages.
    #[arg(long = "log.format", value_enum, default_value_t = LogFormat::Logfmt, global = true)]
    pub log_format: LogFormat,

    /// Most HTTP connections served at once; a new one past it closes the longest-idle one
    /// (or is refused when every connection is busy with a request).
    #[arg(long = "web.max-connections", value_name = "N", default_value_t = 512)]
    pub max_connections: usize,

    /// Longest a client may take to send a request's head; a kept-alive connection idle this
    /// long is closed too.
    #[arg(long = "web.read-header-timeout", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub read_header_timeout: Duration,
}

impl CommonArgs {
    /// The connection limits these flags ask for.
    pub fn connection_limits(&self) -> crate::server::ConnectionLimits {
        crate::server::ConnectionLimits {
            max_connections: self.max_connections.max(1),
            header_timeout: self.read_header_timeout,
            ..crate::server::ConnectionLimits::default()
        }
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text.trim()).map_err(|e| format!("{text:?}: {e}"))?;
    if duration.is_zero() {
        return Err("must be more than 0".into());
    }
    Ok(duration)
}

/// `--log.level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    /// Everything, including per-sample "no data" notes.
    Debug,
    /// Start, stop, state changes.
    Info,
    /// Degraded operation: a collector failing, a peer unreachable.
    Warn,
    /// Only what stops a part from working.
    Error,
}

/// `--log.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// `ts=... level=info msg="..." key=value`, as node_exporter and Alertmanager log.
    Logfmt,
    /// One JSON object per line.
    Json,
}

/// `--web.listen-address`: `host:port`, `[v6]:port`, or `:port` for every interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenAddress {
    /// Host part; `None` means every interface (the `:port` form).
    pub host: Option<String>,
    /// TCP port; 0 lets the kernel choose (the bound address is logged).
    pub port: u16,
}

impl FromStr for ListenAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?} has no port; use host:port or :port"))?;
        let port = port
            .parse::<u16>()
            .map_err(|_| format!("{s:?}: port {port:?} is not a number from 0 to 65535"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let host = (!host.is_empty()).then(|| host.to_owned());
        Ok(Self { host, port })
    }
}

impl fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            None => write!(f, ":{}", self.port),
            Some(h) if h.contains(':') => write!(f, "[{h}]:{}", self.port),
            Some(h) => write!(f, "{h}:{}", self.port),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_address_forms() {
        let any: ListenAddress = ":9470".parse().unwrap();
        assert_eq!(
            any,
            ListenAddress {
                host: None,
                port: 9470
            }
        );
        assert_eq!(any.to_string(), ":9470");

        let v4: ListenAddress = "127.0.0.1:0".parse().unwrap();
        assert_eq!(v4.host.as_deref(), Some("127.0.0.1"));
        assert_eq!(v4.port, 0);

        let v6: ListenAddress = "[::1]:9471".parse().unwrap();
        assert_eq!(v6.host.as_deref(), Some("::1"));
        assert_eq!(v6.to_string(), "[::1]:9471");

        assert!("9470".parse::<ListenAddress>().is_err());
        assert!("localhost:http".parse::<ListenAddress>().is_err());
        assert!(":70000".parse::<ListenAddress>().is_err());
    }
}
