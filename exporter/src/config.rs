//! The exporter's config file (`/etc/aistack/exporter.yaml` by default). Every key is optional;
//! with no file the exporter runs on these defaults.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aistack_common::config::{HumanDuration, Problems, Validate, check_http_url, check_regex};
use serde::Deserialize;

use crate::collectors::docker::DockerConfig;
use crate::collectors::power::PowerEstimationConfig;
use crate::collectors::services::DiscoveryConfig;
use crate::collectors::wol::WolConfig;
use crate::collectors::{CollectorKind, Schedule};
use crate::idle::IdleConfig;

/// Where the config is read from when `--config.file` is not given (if the file exists).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/aistack/exporter.yaml";

/// Shortest allowed sampling interval.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// The whole exporter config.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Per-collector switch and schedule, keyed by collector name (`cpu`, `rapl`, ...).
    pub collectors: BTreeMap<String, CollectorSchedule>,
    /// How `aistack_host_power_estimated_watts` is computed.
    pub power_estimation: PowerEstimationConfig,
    /// NVML settings for the `gpu` collector.
    pub gpu: GpuConfig,
    /// Inference services on this host: GPU processes are attributed to them.
    pub services: Vec<ServiceConfig>,
    /// What counts as host workload (a game) on the GPU.
    pub host_workload: HostWorkloadConfig,
    /// Where the Docker engine listens.
    pub docker: DockerConfig,
    /// Finding services without config.
    pub discovery: DiscoveryConfig,
    /// Which interfaces the wol collector reports.
    pub wol: WolConfig,
    /// When the host counts as idle, and what blocks suspending.
    pub idle: IdleConfig,
}

/// `gpu:`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuConfig {
    /// The NVML library to load: a file name searched the usual way, or a path (default
    /// `libnvidia-ml.so.1`).
    pub nvml_library: String,
    /// Where the GPUs seen are remembered across restarts (default `$STATE_DIRECTORY/gpus.json`
    /// when systemd or the container sets `STATE_DIRECTORY`, else nowhere). Empty: nowhere.
    pub state_file: Option<PathBuf>,
    /// UUIDs to drop from the roster file: GPUs removed for good.
    pub forget: Vec<String>,
}

impl Default for GpuConfig {
    fn default() -> Self {
        Self {
            nvml_library: "libnvidia-ml.so.1".into(),
            state_file: None,
            forget: Vec::new(),
        }
    }
}

impl GpuConfig {
    /// The roster file: `state_file` when set (none when set empty), else `gpus.json` in the
    /// first directory of `state_directory` (systemd's `$STATE_DIRECTORY`, `:`-separated).
    pub fn roster_file(&self, state_directory: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
        match &self.state_file {
            Some(path) if path.as_os_str().is_empty() => None,
            Some(path) => Some(path.clone()),
            None => {
                let first = state_directory?.to_str()?.split(':').next()?;
                (!first.is_empty()).then(|| Path::new(first).join("gpus.json"))
            }
        }
    }
}

/// One entry of `services:`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Unique name, the `service` label.
    pub name: String,
    /// What it is.
    pub kind: ServiceKind,
    /// Base URL.
    pub url: String,
    /// The container it runs in (name or id prefix), for attributing GPU processes.
    pub container: Option<String>,
    /// Regex on the process name or command line, for attributing GPU processes; defaults
    /// by kind when no container is given (`vllm`, `ollama`, `local-?ai`).
    pub process: Option<String>,
    /// Pods whose GPU processes belong to it (Kubernetes): a namespace and a label selector.
    pub pods: Option<PodSelector>,
    /// The GPU node whose own vLLM/Ollama pair this is (the actioner's
    /// `actions.failover.nodes`): its series say `node="..."`, and the shipped alerts page
    /// about that node and hold back while that node's pair is on its fallback.
    pub node: Option<String>,
    /// `host` (default): this host's own service. `cluster`: a cluster Service every node's
    /// exporter probes through one URL; its series carry `scope="cluster"`, and the shipped
    /// alerts page for it once per cluster, when no node reaches it.
    #[serde(default)]
    pub scope: ServiceScope,
}

/// `services[].pods`: the pods of a service, as a Deployment's `matchLabels` selects them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodSelector {
    /// The pods' namespace.
    pub namespace: String,
    /// Labels a pod must have, with these values (`{}`: every pod of the namespace).
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
}

impl PodSelector {
    /// Whether the pod `namespace` with `labels` is one of these.
    pub fn matches(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        namespace == self.namespace
            && self
                .selector
                .iter()
                .all(|(key, value)| labels.get(key) == Some(value))
    }
}

/// A DNS label (RFC 1123), as namespace names are.
fn is_dns_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// `services[].scope`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceScope {
    /// This host's own service.
    #[default]
    Host,
    /// A cluster Service, probed from every node.
    Cluster,
}

impl ServiceConfig {
    /// The server's root, which the probes' paths are joined to. vLLM, LocalAI and Ollama are
    /// often given with the OpenAI-style base users copy into clients (`http://host:8000/v1`):
    /// that `/v1` is dropped, so the probes ask `/health`, not `/v1/health`. An `http` service's
    /// URL is the probe itself and is used as given.
    pub fn base_url(&self) -> &str {
        let url = self.url.trim_end_matches('/');
        // Only a path's last segment: `http://v1` is a host named v1.
        let path_is_v1 = url
            .split_once("://")
            .and_then(|(_, rest)| rest.split_once('/'))
            .is_some_and(|(_, path)| path == "v1" || path.ends_with("/v1"));
        match self.kind {
            ServiceKind::Vllm | ServiceKind::Localai | ServiceKind::Ollama if path_is_v1 => {
                url.strip_suffix("/v1").unwrap_or(url)
            }
            _ => &self.url,
        }
    }
}

/// `services[].kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceKind {
    /// vLLM's OpenAI-compatible server.
    Vllm,
    /// Ollama.
    Ollama,
    /// Open WebUI.
    Openwebui,
    /// LocalAI.
    Localai,
    /// Anything with an HTTP health URL.
    Http,
}

/// `host_workload:`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostWorkloadConfig {
    /// Regexes on a GPU process's name or command line that always count as host workload.
    pub process_patterns: Vec<String>,
    /// Regexes on a process name (`comm` or argv[0]) that never count unless a process pattern
    /// matches: the desktop's own GPU clients.
    pub ignore_patterns: Vec<String>,
    /// Whether any other process that is no configured service counts too (default true).
    pub count_unattributed: bool,
}

impl Default for HostWorkloadConfig {
    fn default() -> Self {
        let strings = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect();
        Self {
            process_patterns: strings(&["steam", "gamescope", "wine", "proton", r"\.exe$"]),
            ignore_patterns: strings(&[
                "^(Xorg|Xwayland|X)$",
                "^(gnome-shell|mutter|kwin_wayland|kwin_x11|plasmashell|plasma-.*|xwaylandvideobr.*)$",
                "^(sway|Hyprland|weston|cosmic-comp|labwc|river|wayfire|niri)$",
                "^(nvidia-persistenced|nvidia-smi|nv-hostengine|dcgm.*)$",
                "^(firefox|chrome|chromium|brave|Isolated Web Co|GPU Process)$",
            ]),
            count_unattributed: true,
        }
    }
}

/// `collectors.<name>:` — every key optional.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorSchedule {
    /// Run this collector (default: the collector's own default, true for all of them today).
    /// `--collector.<name>` / `--no-collector.<name>` override it.
    pub enabled: Option<bool>,
    /// Time between samples (default: the collector's, 1s for most, 5s for hwmon).
    pub interval: Option<HumanDuration>,
    /// Longest one sample may take before it counts as failed (default: the interval).
    pub timeout: Option<HumanDuration>,
}

impl Config {
    /// Whether `kind` runs: the command-line override, else the config, else its default.
    pub fn enabled(&self, kind: CollectorKind, flag: Option<bool>) -> bool {
        flag.or_else(|| self.collectors.get(kind.name()).and_then(|s| s.enabled))
            .unwrap_or(kind.enabled_by_default())
    }

    /// When `kind` samples.
    pub fn schedule(&self, kind: CollectorKind) -> Schedule {
        let configured = self
            .collectors
            .get(kind.name())
            .copied()
            .unwrap_or_default();
        let interval = configured
            .interval
            .map_or(kind.default_interval(), Duration::from);
        let default_timeout = match kind {
            // A probe's own timeout: a hung service must fail its probe, not the whole sample.
            CollectorKind::Services => Duration::from_secs(2).min(interval),
            _ => interval,
        };
        Schedule {
            interval,
            timeout: configured.timeout.map_or(default_timeout, Duration::from),
        }
    }
}

impl Validate for Config {
    fn validate(&self, problems: &mut Problems) {
        for (name, configured) in &self.collectors {
            let Some(kind) = CollectorKind::ALL.into_iter().find(|k| k.name() == name) else {
                let known: Vec<&str> = CollectorKind::ALL.iter().map(|k| k.name()).collect();
                problems.push(
                    format!("collectors.{name}"),
                    format!("unknown collector; known: {}", known.join(", ")),
                );
                continue;
            };
            let schedule = self.schedule(kind);
            if configured.interval.is_some() {
                problems.check(
                    schedule.interval >= MIN_INTERVAL,
                    format!("collectors.{kind}.interval"),
                    format!("must be at least {}", HumanDuration(MIN_INTERVAL)),
                );
            }
            if configured.timeout.is_some() {
                problems.check(
                    !schedule.timeout.is_zero() && schedule.timeout <= schedule.interval,
                    format!("collectors.{kind}.timeout"),
                    format!(
                        "must be more than 0 and at most the interval ({})",
                        HumanDuration(schedule.interval)
                    ),
                );
            }
        }
        self.power_estimation.validate(problems);
        self.idle.validate(problems);
        problems.check(
            !self.gpu.nvml_library.trim().is_empty(),
            "gpu.nvml_library",
            "must not be empty",
        );
        if let Some(file) = &self.gpu.state_file {
            problems.check(
                file.as_os_str().is_empty() || file.is_absolute(),
                "gpu.state_file",
                format!("must be an absolute path (or \"\" for none), got {file:?}"),
            );
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, service) in self.services.iter().enumerate() {
            let at = |key: &str| format!("services[{i}].{key}");
            if service.name.trim().is_empty() {
                problems.push(at("name"), "must not be empty");
            } else if !names.insert(service.name.as_str()) {
                problems.push(
                    at("name"),
                    format!("duplicate service name {:?}", service.name),
                );
            }
            check_http_url(problems, at("url"), &service.url);
            if let Some(node) = &service.node {
                problems.check(
                    aistack_common::node::valid(node),
                    at("node"),
                    format!("{node:?} is not a node name (a host name or an IP address)"),
                );
            }
            if let Some(pods) = &service.pods {
                problems.check(
                    is_dns_label(&pods.namespace),
                    at("pods.namespace"),
                    format!("{:?} is not a namespace name (lowercase letters, digits and '-', at most 63)", pods.namespace),
                );
                for key in pods.selector.keys() {
                    problems.check(
                        !key.is_empty() && key.len() <= 317,
                        at("pods.selector"),
                        format!("{key:?} is not a label key"),
                    );
                }
            }
            if let Some(pattern) = &service.process {
                check_regex(problems, at("process"), pattern, str::to_owned);
            }
        }
        // A service whose pods all match an earlier one's selector claims none of them: the
        // first service that claims a process has it.
        for (j, later) in self.services.iter().enumerate() {
            let Some(later_pods) = &later.pods else {
                continue;
            };
            let shadow = self.services[..j].iter().find(|earlier| {
                earlier.pods.as_ref().is_some_and(|pods| {
                    pods.namespace == later_pods.namespace
                        && pods
                            .selector
                            .iter()
                            .all(|(k, v)| later_pods.selector.get(k) == Some(v))
                })
            });
            if let Some(earlier) = shadow {
                problems.push(
                    format!("services[{j}].pods"),
                    format!(
                        "every pod it selects is also {:?}'s, which comes first and claims them: make the selectors tell them apart",
                        earlier.name
                    ),
                );
            }
        }
        for (key, patterns) in [
            ("process_patterns", &self.host_workload.process_patterns),
            ("ignore_patterns", &self.host_workload.ignore_patterns),
        ] {
            for (i, pattern) in patterns.iter().enumerate() {
                check_regex(
                    problems,
                    format!("host_workload.{key}[{i}]"),
                    pattern,
                    str::to_owned,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use aistack_common::config::parse;

    use super::*;

    #[test]
    fn defaults_without_a_file() {
        let config: Config = parse("").unwrap();
        assert!(config.enabled(CollectorKind::Cpu, None));
        assert_eq!(
            config.schedule(CollectorKind::Hwmon),
            Schedule {
                interval: Duration::from_secs(5),
                timeout: Duration::from_secs(5)
            }
        );
        assert_eq!(config.power_estimation.baseline_watts, 30.0);
    }

    #[test]
    fn the_gpu_roster_file_from_the_config_or_the_state_directory() {
        let os = |s: &str| std::ffi::OsString::from(s);
        let config: Config = parse("").unwrap();
        assert_eq!(config.gpu.roster_file(None), None);
        assert_eq!(
            config
                .gpu
                .roster_file(Some(&os("/var/lib/aistack/exporter:/var/lib/other"))),
            Some(PathBuf::from("/var/lib/aistack/exporter/gpus.json"))
        );
        let config: Config = parse("gpu: {state_file: /srv/gpus.json}").unwrap();
        assert_eq!(
            config.gpu.roster_file(Some(&os("/var/lib/x"))),
            Some(PathBuf::from("/srv/gpus.json"))
        );
        let config: Config = parse("gpu: {state_file: ''}").unwrap();
        assert_eq!(config.gpu.roster_file(Some(&os("/var/lib/x"))), None);
        let err = parse::<Config>("gpu: {state_file: gpus.json}").unwrap_err();
        assert!(format!("{err:?}").contains("gpu.state_file"), "{err:?}");
    }

    #[test]
    fn services_name_pods_by_namespace_and_selector() {
        let config: Config = parse(
            "services: [{name: llm, kind: vllm, url: 'http://llm.ml.svc:8000', pods: {namespace: ml, selector: {app: llm}}}]",
        )
        .unwrap();
        let pods = config.services[0].pods.as_ref().unwrap();
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        assert!(pods.matches("ml", &labels(&[("app", "llm"), ("x", "y")])));
        assert!(!pods.matches("ml", &labels(&[("app", "llm2")])));
        assert!(!pods.matches("dev", &labels(&[("app", "llm")])));
        let err = parse::<Config>(
            "services: [{name: llm, kind: vllm, url: 'http://x:8000', pods: {namespace: ML_Prod, selector: {'': x}}}]",
        )
        .unwrap_err();
        let text = format!("{err:?}");
        assert!(text.contains("services[0].pods.namespace"), "{text}");
        assert!(text.contains("services[0].pods.selector"), "{text}");
        assert!(
            parse::<Config>("services: [{name: llm, kind: vllm, url: 'http://x:8000', pods: {namespace: ml, labels: {}}}]").is_err(),
            "unknown keys are refused"
        );
        // A later service whose pods an earlier selector takes already: it would claim none.
        let err = parse::<Config>(
            "services:\n\
             - {name: a, kind: vllm, url: 'http://a:8000', pods: {namespace: ml, selector: {app: vllm}}}\n\
             - {name: b, kind: vllm, url: 'http://b:8000', pods: {namespace: ml, selector: {app: vllm, node: b}}}\n\
             - {name: c, kind: vllm, url: 'http://c:8000', pods: {namespace: dev, selector: {app: vllm}}}\n",
        )
        .unwrap_err();
        let text = format!("{err:?}");
        assert!(text.contains("services[1].pods"), "{text}");
        assert!(
            !text.contains("services[2].pods"),
            "another namespace: {text}"
        );
        assert!(
            parse::<Config>(
                "services:\n\
                 - {name: a, kind: vllm, url: 'http://a:8000', pods: {namespace: ml, selector: {app: vllm-a}}}\n\
                 - {name: b, kind: vllm, url: 'http://b:8000', pods: {namespace: ml, selector: {app: vllm-b}}}\n",
            )
            .is_ok(),
            "selectors that tell the pods apart"
        );
    }

    #[test]
    fn flags_win_over_config() {
        let config: Config =
            parse("collectors: {cpu: {enabled: false}, rapl: {interval: 2s}}").unwrap();
        assert!(!config.enabled(CollectorKind::Cpu, None));
        assert!(config.enabled(CollectorKind::Cpu, Some(true)));
        assert!(!config.enabled(CollectorKind::Rapl, Some(false)));
        assert_eq!(
            config.schedule(CollectorKind::Rapl).interval,
            Duration::from_secs(2)
        );
        assert_eq!(
            config.schedule(CollectorKind::Rapl).timeout,
            Duration::from_secs(2)
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let text = "collectors:\n  cpu: {interval: 10ms}\n  hwmon: {interval: 1s, timeout: 2s}\n\
                    power_estimation: {baseline_watts: -3}\n";
        let lines: Vec<String> = parse::<Config>(text)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            lines,
            [
                "collectors.cpu.interval: must be at least 100ms",
                "collectors.hwmon.timeout: must be more than 0 and at most the interval (1s)",
                "power_estimation.baseline_watts: must be a number of watts >= 0, got -3",
            ]
        );
    }

    #[test]
    fn urls_and_patterns_are_checked_where_they_are() {
        let text = r#"
services:
  - {name: vllm, kind: vllm, url: "127.0.0.1:8000", process: "vllm("}
  - {name: vllm, kind: ollama, url: "ftp://host/"}
  - {name: ok, kind: http, url: "https://host:8443/health"}
host_workload: {process_patterns: ["steam", "[a-"], ignore_patterns: ["(?<x"]}
idle: {gates: {processes: ["rsync", "borg("]}}
"#;
        let lines: Vec<String> = parse::<Config>(text)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            lines,
            [
                "idle.gates.processes[1]: invalid regex \"borg(\": unclosed group",
                "services[0].url: invalid URL \"127.0.0.1:8000\": expected http://host[:port][/path] or https://...",
                "services[0].process: invalid regex \"vllm(\": unclosed group",
                "services[1].name: duplicate service name \"vllm\"",
                "services[1].url: invalid URL \"ftp://host/\": expected http://host[:port][/path] or https://...",
                "host_workload.process_patterns[1]: invalid regex \"[a-\": unclosed character class",
                "host_workload.ignore_patterns[0]: invalid regex \"(?<x\": unclosed capture group name",
            ]
        );
    }

    #[test]
    fn unknown_collectors_and_keys_are_errors() {
        let problems = parse::<Config>("collectors: {gpux: {}, cpux: {}}").unwrap_err();
        let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "collectors.cpux: unknown collector; known: cpu, rapl, hwmon, gpu, power, docker, services, wol, logind, idle",
                "collectors.gpux: unknown collector; known: cpu, rapl, hwmon, gpu, power, docker, services, wol, logind, idle",
            ]
        );
        let problems = parse::<Config>("collectors: {cpu: {intervall: 1s}}").unwrap_err();
        assert_eq!(problems[0].path, "collectors.cpu.intervall");
        assert!(
            problems[0].message.contains("unknown field `intervall`"),
            "{problems:?}"
        );
        let problems = parse::<Config>("colectors: {}").unwrap_err();
        assert!(
            problems[0].message.contains("unknown field `colectors`"),
            "{problems:?}"
        );
    }
}
