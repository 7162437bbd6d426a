//! The actioner's config file (`/etc/aistack/actioner.yaml` by default).
//!
//! Targets (hosts, MACs, containers, deployments) come only from the allowlists here; an alert's
//! label may select among them, never define one. `validate` checks every rule against them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use aistack_common::config::{HumanDuration, Problems, Validate};
use serde::Deserialize;

/// Where the config is read from when `--config.file` is not given (if the file exists).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/aistack/actioner.yaml";

/// The whole actioner config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This host's name; suspend acts only for alerts about it (default: the kernel hostname).
    pub host: Option<String>,
    /// Directory holding the journal (default `/var/lib/aistack/actioner`).
    pub state_dir: PathBuf,
    /// Plan and journal every action without acting (default false).
    pub dry_run: bool,
    /// The exporter, for re-checks at action time (default `http://127.0.0.1:9470`).
    pub exporter_url: String,
    /// Who may call the API.
    pub auth: AuthConfig,
    /// Request limits.
    pub limits: LimitsConfig,
    /// Which alerts trigger which actions (none by default).
    pub rules: Vec<Rule>,
    /// Per-action settings and allowlists.
    pub actions: ActionsConfig,
    /// The Docker engine the failover and repair actions drive.
    pub docker: DockerConfig,
}

pub use aistack_common::docker::DockerConfig;

impl Default for Config {
    fn default() -> Self {
        Self {
            host: None,
            state_dir: PathBuf::from("/var/lib/aistack/actioner"),
            dry_run: false,
            exporter_url: "http://127.0.0.1:9470".into(),
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
            rules: Vec::new(),
            actions: ActionsConfig::default(),
            docker: DockerConfig::default(),
        }
    }
}

/// `auth:` — the API refuses every request but /healthz and /metrics without these.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// File holding the bearer token (required; the actioner refuses to start without it).
    pub bearer_token_file: PathBuf,
    /// Optional HTTP Basic credentials, for clients that cannot send a bearer token.
    pub basic: Option<BasicAuthConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            bearer_token_file: PathBuf::from("/etc/aistack/actioner.token"),
            basic: None,
        }
    }
}

/// `auth.basic:`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicAuthConfig {
    /// User name.
    pub username: String,
    /// File holding the password.
    pub password_file: PathBuf,
}

/// `limits:`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest accepted request body (default 1 MiB); larger ones get 413.
    pub max_body_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
        }
    }
}

/// One rule: which alerts, which action, on which target.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Unique name, recorded in the journal.
    pub name: String,
    /// Labels the alert must have, with these exact values.
    #[serde(default, rename = "match")]
    pub match_labels: BTreeMap<String, String>,
    /// Labels whose values must match these regular expressions (anchored, as in Alertmanager).
    #[serde(default)]
    pub match_re: BTreeMap<String, String>,
    /// Which transitions trigger the action (default firing).
    #[serde(default)]
    pub on: Trigger,
    /// The action to run.
    pub action: ActionKind,
    /// A fixed target from the action's allowlist.
    pub target: Option<String>,
    /// An alert label whose value selects the target from the action's allowlist.
    pub target_label: Option<String>,
    /// Least time between two runs of this rule's action on one target.
    pub cooldown: Option<HumanDuration>,
    /// Plan and journal without acting, for this rule only.
    pub dry_run: Option<bool>,
}

/// `rules[].on`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// When the alert fires.
    #[default]
    Firing,
    /// When it resolves.
    Resolved,
    /// Both.
    Both,
}

/// The actions the actioner can run.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ActionKind {
    /// Suspend this host through systemd-logind.
    Suspend,
    /// Send a Wake-on-LAN magic packet.
    Wake,
    /// Move inference from the primary (vLLM) to the fallback (Ollama).
    Failover,
    /// Move it back.
    Failback,
    /// Restart or recreate an unhealthy container or Deployment.
    Repair,
    /// Push a notification through ntfy.
    Notify,
}

impl ActionKind {
    /// Every action.
    pub const ALL: [ActionKind; 6] = [
        Self::Suspend,
        Self::Wake,
        Self::Failover,
        Self::Failback,
        Self::Repair,
        Self::Notify,
    ];

    /// The action named `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }

    /// The name used in config, the API and labels.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Suspend => "suspend",
            Self::Wake => "wake",
            Self::Failover => "failover",
            Self::Failback => "failback",
            Self::Repair => "repair",
            Self::Notify => "notify",
        }
    }
}

impl fmt::Display for ActionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `actions:`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActionsConfig {
    /// `actions.suspend`.
    pub suspend: SuspendConfig,
    /// `actions.wake`.
    pub wake: WakeConfig,
    /// `actions.failover` (also used by failback).
    pub failover: FailoverConfig,
    /// `actions.repair`.
    pub repair: RepairConfig,
    /// `actions.notify`.
    pub notify: NotifyConfig,
}

/// `actions.suspend`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SuspendConfig {
    /// Which logind sleep (default suspend).
    pub mode: SuspendMode,
    /// After this actioner suspended the host, refuse to suspend it again until it has been
    /// awake this long, whatever stale alert arrives (default 15m).
    pub resume_grace: HumanDuration,
}

impl Default for SuspendConfig {
    fn default() -> Self {
        Self {
            mode: SuspendMode::Suspend,
            resume_grace: HumanDuration::from_secs(15 * 60),
        }
    }
}

/// `actions.suspend.mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SuspendMode {
    /// Suspend to RAM.
    #[default]
    Suspend,
    /// Suspend to disk.
    Hibernate,
    /// Both at once.
    HybridSleep,
    /// Suspend, then hibernate after a delay.
    SuspendThenHibernate,
}

/// `actions.wake`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WakeConfig {
    /// File holding the relay key for `POST /api/v1/wake`.
    pub key_file: Option<PathBuf>,
    /// Hosts that may be woken, by name.
    pub targets: BTreeMap<String, WakeTarget>,
}

/// `actions.wake.targets.<name>`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WakeTarget {
    /// The NIC's MAC, in any common notation.
    pub mac: String,
    /// Broadcast address to send the magic packet to (default 255.255.255.255).
    #[serde(default = "default_broadcast")]
    pub broadcast: String,
    /// UDP port (default 9; some NICs listen on 7).
    #[serde(default = "default_wol_port")]
    pub port: u16,
    /// SecureOn password, six bytes written like a MAC, for NICs that require one.
    pub secureon: Option<String>,
}

fn default_broadcast() -> String {
    "255.255.255.255".into()
}

const fn default_wol_port() -> u16 {
    9
}

/// `actions.failover`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailoverConfig {
    /// Where the inference services run (default docker).
    pub platform: Platform,
    /// Containers, for `platform: docker`.
    pub docker: Option<DockerFailover>,
    /// Deployments and Service, for `platform: kubernetes`.
    pub kubernetes: Option<KubernetesFailover>,
    /// Health URL of the primary (vLLM), checked before failing back.
    pub primary_health_url: String,
    /// Health URL of the fallback (Ollama), checked after failing over.
    pub fallback_health_url: String,
    /// How long the fallback may take to answer its health URL after failing over (default 2m).
    pub fallback_timeout: HumanDuration,
    /// How long the primary may take to load its model and answer after failing back
    /// (default 15m); past it the fallback stays.
    pub primary_timeout: HumanDuration,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        Self {
            platform: Platform::Docker,
            docker: None,
            kubernetes: None,
            primary_health_url: "http://127.0.0.1:8000/health".into(),
            fallback_health_url: "http://127.0.0.1:11434/api/tags".into(),
            fallback_timeout: HumanDuration::from_secs(120),
            primary_timeout: HumanDuration::from_secs(900),
        }
    }
}

/// Container or cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    /// The Docker engine on this host.
    Docker,
    /// A Kubernetes cluster.
    Kubernetes,
}

/// `actions.failover.docker`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerFailover {
    /// Primary container name.
    pub primary: String,
    /// Fallback container name.
    pub fallback: String,
}

/// `actions.failover.kubernetes`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesFailover {
    /// Namespace of both Deployments and the Service.
    pub namespace: String,
    /// Primary Deployment.
    pub primary: String,
    /// Fallback Deployment.
    pub fallback: String,
    /// The Service clients use, re-pointed between the two.
    pub service: String,
}

/// `actions.repair`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RepairConfig {
    /// Containers that may be repaired.
    pub docker: DockerRepair,
    /// Deployments that may be restarted.
    pub kubernetes: KubernetesRepair,
    /// Repairs per target per window before giving up (default 3).
    pub max_attempts: u32,
    /// The window (default 1h).
    pub window: HumanDuration,
    /// How long a repaired container may take to report healthy before the next step
    /// (default 2m).
    pub healthy_timeout: HumanDuration,
}

impl Default for RepairConfig {
    fn default() -> Self {
        Self {
            docker: DockerRepair::default(),
            kubernetes: KubernetesRepair::default(),
            max_attempts: 3,
            window: HumanDuration::from_secs(3600),
            healthy_timeout: HumanDuration::from_secs(120),
        }
    }
}

/// `actions.repair.docker`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DockerRepair {
    /// Container names.
    pub containers: Vec<String>,
}

/// `actions.repair.kubernetes`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesRepair {
    /// `namespace/name` of each Deployment.
    pub deployments: Vec<String>,
}

/// `actions.notify`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotifyConfig {
    /// ntfy settings; without them, notify is unavailable.
    pub ntfy: Option<NtfyConfig>,
    /// Buttons on notifications that call back into this actioner; none without this.
    pub buttons: Option<ButtonsConfig>,
}

/// `actions.notify.buttons`: ntfy action buttons, signed links to `POST /api/v1/buttons/{token}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ButtonsConfig {
    /// This actioner's address as the phones reach it (`https://aistack.home.example`).
    pub url: String,
    /// A secret of at least 32 characters that signs the links (`openssl rand -hex 32`).
    pub key_file: PathBuf,
    /// How long a button works after its notification was sent (default 12h).
    #[serde(default = "default_button_ttl")]
    pub ttl: HumanDuration,
    /// Which buttons go on which alerts' notifications, in order; ntfy shows at most three.
    #[serde(default)]
    pub offer: Vec<ButtonOffer>,
}

fn default_button_ttl() -> HumanDuration {
    HumanDuration::from_secs(12 * 3600)
}

/// `actions.notify.buttons.offer[]`: a button on the firing notifications of matching alerts.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ButtonOffer {
    /// Labels the alert must have, with these exact values.
    #[serde(default, rename = "match")]
    pub match_labels: BTreeMap<String, String>,
    /// Labels whose values must match these regular expressions (anchored).
    #[serde(default)]
    pub match_re: BTreeMap<String, String>,
    /// The button's text; `{target}` is replaced by the target.
    pub label: String,
    /// The action a press runs.
    pub action: ActionKind,
    /// A fixed target from the action's allowlist.
    pub target: Option<String>,
    /// An alert label whose value selects the target from the action's allowlist.
    pub target_label: Option<String>,
}

/// `actions.notify.ntfy`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NtfyConfig {
    /// Server base URL (default https://ntfy.sh).
    #[serde(default = "default_ntfy_url")]
    pub url: String,
    /// Topic to publish to.
    pub topic: String,
    /// File holding an access token (optional).
    pub token_file: Option<PathBuf>,
    /// ntfy priority (1..5) per alert severity.
    #[serde(default = "default_priorities")]
    pub priorities: BTreeMap<String, u8>,
}

fn default_ntfy_url() -> String {
    "https://ntfy.sh".into()
}

fn default_priorities() -> BTreeMap<String, u8> {
    [("critical", 5), ("warning", 4), ("info", 3)]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
}

/// A MAC address in any common notation: `aa:bb:cc:dd:ee:ff`, `aa-bb-cc-dd-ee-ff`,
/// `aabb.ccdd.eeff` or `aabbccddeeff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddress(pub [u8; 6]);

impl FromStr for MacAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || format!("invalid MAC {s:?}");
        let hex: String = match s.trim() {
            t if t.len() == 17 && (t.split(':').count() == 6 || t.split('-').count() == 6) => {
                let sep = if t.contains(':') { ':' } else { '-' };
                let parts: Vec<&str> = t.split(sep).collect();
                if parts.len() != 6 || parts.iter().any(|p| p.len() != 2) {
                    return Err(invalid());
                }
                parts.concat()
            }
            t if t.len() == 14 && t.split('.').count() == 3 => {
                let parts: Vec<&str> = t.split('.').collect();
                if parts.iter().any(|p| p.len() != 4) {
                    return Err(invalid());
                }
                parts.concat()
            }
            t if t.len() == 12 => t.to_owned(),
            _ => return Err(invalid()),
        };
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid());
        }
        let mut bytes = [0u8; 6];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = hex
                .get(2 * i..2 * i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(invalid)?;
        }
        Ok(Self(bytes))
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// Compiles a `match_re` value the way Alertmanager does: anchored at both ends.
pub fn anchored_regex(pattern: &str) -> Result<regex::Regex, regex::Error> {
    regex::Regex::new(&format!("^(?:{pattern})$"))
}

/// Problems with a `match`/`match_re` pair (paths from `at`): at least one is set
/// (`missing` says so otherwise) and every regex compiles.
fn check_matchers(
    problems: &mut Problems,
    at: &dyn Fn(&str) -> String,
    match_labels: &BTreeMap<String, String>,
    match_re: &BTreeMap<String, String>,
    missing: &str,
) {
    problems.check(
        !match_labels.is_empty() || !match_re.is_empty(),
        at("match"),
        missing,
    );
    for (label, pattern) in match_re {
        if let Err(err) = anchored_regex(pattern) {
            problems.push(
                at(&format!("match_re.{label}")),
                format!("invalid regex {pattern:?}: {}", regex_reason(&err)),
            );
        }
    }
}

fn check_url(problems: &mut Problems, path: &str, url: &str) {
    let ok = url
        .parse::<axum::http::Uri>()
        .ok()
        .filter(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some());
    problems.check(
        ok.is_some(),
        path,
        format!("invalid URL {url:?}: expected http://host[:port][/path] or https://..."),
    );
}

impl Config {
    /// This host's name: `host`, else the kernel's hostname.
    pub fn host_name(&self) -> String {
        self.host.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "localhost".into())
        })
    }

    /// The allowlist a rule's target must come from; `None` for actions without targets.
    pub fn allowlist(&self, action: ActionKind) -> Option<BTreeSet<String>> {
        match action {
            ActionKind::Wake => Some(self.actions.wake.targets.keys().cloned().collect()),
            ActionKind::Repair => Some(
                self.actions
                    .repair
                    .docker
                    .containers
                    .iter()
                    .chain(&self.actions.repair.kubernetes.deployments)
                    .cloned()
                    .collect(),
            ),
            ActionKind::Suspend => Some(BTreeSet::from([self.host_name()])),
            ActionKind::Failover | ActionKind::Failback | ActionKind::Notify => None,
        }
    }

    /// Checks the files the config names: the bearer token (required, non-empty) and any
    /// other secret file. Reads them but keeps nothing.
    pub fn check_files(&self, problems: &mut Problems) {
        let mut secret = |path: &str, file: &Path| match std::fs::read_to_string(file) {
            Ok(text) if text.trim().is_empty() => {
                problems.push(path, format!("{} is empty", file.display()));
            }
            Ok(_) => {}
            Err(err) => problems.push(path, format!("cannot read {}: {err}", file.display())),
        };
        secret("auth.bearer_token_file", &self.auth.bearer_token_file);
        if let Some(basic) = &self.auth.basic {
            secret("auth.basic.password_file", &basic.password_file);
        }
        if let Some(key_file) = &self.actions.wake.key_file {
            secret("actions.wake.key_file", key_file);
        }
        if let Some(token_file) = self
            .actions
            .notify
            .ntfy
            .as_ref()
            .and_then(|n| n.token_file.as_ref())
        {
            secret("actions.notify.ntfy.token_file", token_file);
        }
        if let Some(buttons) = &self.actions.notify.buttons {
            match std::fs::read_to_string(&buttons.key_file) {
                Ok(key) if key.trim().len() < 32 => problems.push(
                    "actions.notify.buttons.key_file",
                    format!(
                        "{} holds {} characters; a signing key needs at least 32 (openssl rand -hex 32)",
                        buttons.key_file.display(),
                        key.trim().len()
                    ),
                ),
                Ok(_) => {}
                Err(err) => problems.push(
                    "actions.notify.buttons.key_file",
                    format!("cannot read {}: {err}", buttons.key_file.display()),
                ),
            }
        }
    }
}

impl Validate for Config {
    fn validate(&self, problems: &mut Problems) {
        if let Some(host) = &self.host {
            problems.check(!host.trim().is_empty(), "host", "must not be empty");
        }
        problems.check(
            self.state_dir.is_absolute(),
            "state_dir",
            format!("must be an absolute path, got {:?}", self.state_dir),
        );
        check_url(problems, "exporter_url", &self.exporter_url);
        problems.check(
            self.limits.max_body_bytes >= 1024,
            "limits.max_body_bytes",
            "must be at least 1024",
        );
        self.validate_rules(problems);
        self.validate_actions(problems);
    }
}

impl Config {
    fn validate_rules(&self, problems: &mut Problems) {
        let mut names = BTreeSet::new();
        for (i, rule) in self.rules.iter().enumerate() {
            let at = |key: &str| format!("rules[{i}].{key}");
            if rule.name.trim().is_empty() {
                problems.push(at("name"), "must not be empty");
            } else if !names.insert(rule.name.as_str()) {
                problems.push(at("name"), format!("duplicate rule name {:?}", rule.name));
            }
            check_matchers(
                problems,
                &at,
                &rule.match_labels,
                &rule.match_re,
                "a rule needs `match` or `match_re`; write match_re: {alertname: \".+\"} to match every alert",
            );
            self.check_action(
                problems,
                &at,
                rule.action,
                rule.target.as_ref(),
                rule.target_label.as_ref(),
            );
        }
    }

    /// Problems with running `action` on `target` or `target_label` (paths from `at`): the
    /// target is allowlisted, the action takes one, and the action is configured.
    fn check_action(
        &self,
        problems: &mut Problems,
        at: &dyn Fn(&str) -> String,
        action: ActionKind,
        target: Option<&String>,
        target_label: Option<&String>,
    ) {
        if target.is_some() && target_label.is_some() {
            problems.push(at("target"), "set `target` or `target_label`, not both");
        }
        match (self.allowlist(action), target) {
            (Some(allowed), Some(target)) if !allowed.contains(target) => problems.push(
                at("target"),
                format!(
                    "{target:?} is not in the {action} allowlist ({})",
                    list(&allowed)
                ),
            ),
            (None, Some(_)) => {
                problems.push(at("target"), format!("the {action} action takes no target"));
            }
            _ => {}
        }
        if target_label.is_some() && self.allowlist(action).is_none() {
            problems.push(
                at("target_label"),
                format!("the {action} action takes no target"),
            );
        }
        if action == ActionKind::Notify {
            problems.check(
                self.actions.notify.ntfy.is_some(),
                at("action"),
                "notify needs actions.notify.ntfy",
            );
        }
        if matches!(action, ActionKind::Failover | ActionKind::Failback) {
            let configured = match self.actions.failover.platform {
                Platform::Docker => self.actions.failover.docker.is_some(),
                Platform::Kubernetes => self.actions.failover.kubernetes.is_some(),
            };
            problems.check(
                configured,
                at("action"),
                format!(
                    "{action} needs actions.failover.{}",
                    platform_key(self.actions.failover.platform)
                ),
            );
        }
    }

    fn validate_actions(&self, problems: &mut Problems) {
        for (name, target) in &self.actions.wake.targets {
            let at = |key: &str| format!("actions.wake.targets.{name}.{key}");
            if let Err(err) = target.mac.parse::<MacAddress>() {
                problems.push(at("mac"), err);
            }
            if let Some(password) = &target.secureon
                && password.parse::<MacAddress>().is_err()
            {
                problems.push(
                    at("secureon"),
                    "invalid SecureOn password: six bytes written like a MAC (aa:bb:cc:dd:ee:ff)",
                );
            }
            if target.broadcast.parse::<IpAddr>().is_err() {
                problems.push(
                    at("broadcast"),
                    format!("invalid IP address {:?}", target.broadcast),
                );
            }
            problems.check(target.port != 0, at("port"), "must be 1..65535");
        }
        let failover = &self.actions.failover;
        check_url(
            problems,
            "actions.failover.primary_health_url",
            &failover.primary_health_url,
        );
        check_url(
            problems,
            "actions.failover.fallback_health_url",
            &failover.fallback_health_url,
        );
        if let Some(docker) = &failover.docker {
            problems.check(
                docker.primary != docker.fallback,
                "actions.failover.docker.fallback",
                "must differ from primary",
            );
        }
        if let Some(k8s) = &failover.kubernetes {
            problems.check(
                k8s.primary != k8s.fallback,
                "actions.failover.kubernetes.fallback",
                "must differ from primary",
            );
        }
        let repair = &self.actions.repair;
        problems.check(
            repair.max_attempts >= 1,
            "actions.repair.max_attempts",
            "must be at least 1",
        );
        problems.check(
            !repair.window.0.is_zero(),
            "actions.repair.window",
            "must be more than 0",
        );
        for (i, deployment) in repair.kubernetes.deployments.iter().enumerate() {
            let valid = deployment.split_once('/').is_some_and(|(ns, name)| {
                !ns.is_empty() && !name.is_empty() && !name.contains('/')
            });
            problems.check(
                valid,
                format!("actions.repair.kubernetes.deployments[{i}]"),
                format!("expected namespace/name, got {deployment:?}"),
            );
        }
        if let Some(ntfy) = &self.actions.notify.ntfy {
            check_url(problems, "actions.notify.ntfy.url", &ntfy.url);
            let topic_ok = !ntfy.topic.is_empty()
                && ntfy.topic.len() <= 64
                && ntfy
                    .topic
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            problems.check(
                topic_ok,
                "actions.notify.ntfy.topic",
                format!("invalid topic {:?}: 1 to 64 of [A-Za-z0-9_-]", ntfy.topic),
            );
            for (severity, priority) in &ntfy.priorities {
                problems.check(
                    (1..=5).contains(priority),
                    format!("actions.notify.ntfy.priorities.{severity}"),
                    format!("ntfy priorities are 1..5, got {priority}"),
                );
            }
        }
        if let Some(buttons) = &self.actions.notify.buttons {
            self.validate_buttons(problems, buttons);
        }
    }

    fn validate_buttons(&self, problems: &mut Problems, buttons: &ButtonsConfig) {
        problems.check(
            self.actions.notify.ntfy.is_some(),
            "actions.notify.buttons",
            "buttons go on notifications: they need actions.notify.ntfy",
        );
        check_url(problems, "actions.notify.buttons.url", &buttons.url);
        problems.check(
            (60..=30 * 86_400).contains(&buttons.ttl.0.as_secs()),
            "actions.notify.buttons.ttl",
            "must be 1m to 30d",
        );
        for (i, offer) in buttons.offer.iter().enumerate() {
            let at = |key: &str| format!("actions.notify.buttons.offer[{i}].{key}");
            check_matchers(
                problems,
                &at,
                &offer.match_labels,
                &offer.match_re,
                "an offer needs `match` or `match_re`",
            );
            let label = offer.label.trim();
            problems.check(
                !label.is_empty() && label.chars().count() <= 40,
                at("label"),
                "must be 1 to 40 characters",
            );
            problems.check(
                offer.action != ActionKind::Notify,
                at("action"),
                "a button cannot run notify",
            );
            self.check_action(
                problems,
                &at,
                offer.action,
                offer.target.as_ref(),
                offer.target_label.as_ref(),
            );
            // Wake and suspend default to the host the alert is about.
            if offer.action == ActionKind::Repair
                && offer.target.is_none()
                && offer.target_label.is_none()
            {
                problems.push(
                    at("target"),
                    format!("a {} button needs `target` or `target_label`", offer.action),
                );
            }
        }
    }
}

/// The last line of a regex error ("unclosed group"): the full message spans several lines,
/// and a problem is one line.
fn regex_reason(err: &regex::Error) -> String {
    let text = err.to_string();
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or(&text);
    last.trim().trim_start_matches("error: ").to_owned()
}

fn platform_key(platform: Platform) -> &'static str {
    match platform {
        Platform::Docker => "docker",
        Platform::Kubernetes => "kubernetes",
    }
}

fn list(allowed: &BTreeSet<String>) -> String {
    if allowed.is_empty() {
        "empty".into()
    } else {
        allowed.iter().cloned().collect::<Vec<_>>().join(", ")
    }
}

#[cfg(test)]
mod tests {
    use aistack_common::config::parse;

    use super::*;

    /// Every problem check-config reports for `text`, as printed.
    fn problems_in(text: &str) -> Vec<String> {
        parse::<Config>(text)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    const CONTRACT_EXAMPLE: &str =
        include_str!("../../tests/fixtures/config/actioner-contract.yaml");

    #[test]
    fn the_contract_example_is_valid() {
        let config: Config = parse(CONTRACT_EXAMPLE).unwrap_or_else(|p| panic!("{p:#?}"));
        assert_eq!(config.host.as_deref(), Some("gpu-box"));
        assert_eq!(config.rules.len(), 5);
        assert_eq!(config.rules[1].action, ActionKind::Failover);
        assert_eq!(config.rules[2].on, Trigger::Resolved);
        assert_eq!(config.actions.wake.targets["gpu-box"].port, 9);
        assert_eq!(config.actions.suspend.mode, SuspendMode::Suspend);
    }

    #[test]
    fn defaults_are_valid() {
        let config: Config = parse("").unwrap();
        assert_eq!(config.limits.max_body_bytes, 1_048_576);
        assert!(config.rules.is_empty());
    }

    #[test]
    fn mac_notations() {
        let want = MacAddress([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x0f]);
        for s in [
            "aa:bb:cc:dd:ee:0f",
            "AA-BB-CC-DD-EE-0F",
            "aabb.ccdd.ee0f",
            "aabbccddee0f",
        ] {
            assert_eq!(s.parse::<MacAddress>(), Ok(want), "{s}");
        }
        assert_eq!(want.to_string(), "aa:bb:cc:dd:ee:0f");
        for s in [
            "zz:bb:cc:dd:ee:ff",
            "aa:bb:cc:dd:ee",
            "aa:bb:cc:dd:ee:ff:00",
            "aabbccddeeff00",
            "aa:bbb:cc:dd:e:ff",
            "+a:bb:cc:dd:ee:ff",
            "",
        ] {
            assert!(s.parse::<MacAddress>().is_err(), "{s}");
        }
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let text = r#"
host: gpu-box
state_dir: relative/dir
exporter_url: "ftp://x"
rules:
  - {name: a, match: {alertname: X}, action: wake, target: other-box}
  - {name: a, action: repair, target: vllm, target_label: container}
  - {name: b, match_re: {severity: "(crit"}, action: notify}
  - {name: c, match: {alertname: Y}, action: failover, target: vllm}
actions:
  wake:
    targets:
      gpu-host: {mac: "zz:bb:cc:dd:ee:ff", broadcast: "192.168.0.300", port: 0}
  repair:
    docker: {containers: [open-webui]}
    kubernetes: {deployments: ["ollama"]}
    max_attempts: 0
"#;
        assert_eq!(
            problems_in(text),
            [
                r#"state_dir: must be an absolute path, got "relative/dir""#,
                r#"exporter_url: invalid URL "ftp://x": expected http://host[:port][/path] or https://..."#,
                r#"rules[0].target: "other-box" is not in the wake allowlist (gpu-host)"#,
                r#"rules[1].name: duplicate rule name "a""#,
                r#"rules[1].match: a rule needs `match` or `match_re`; write match_re: {alertname: ".+"} to match every alert"#,
                "rules[1].target: set `target` or `target_label`, not both",
                r#"rules[1].target: "vllm" is not in the repair allowlist (ollama, open-webui)"#,
                r#"rules[2].match_re.severity: invalid regex "(crit": unclosed group"#,
                "rules[2].action: notify needs actions.notify.ntfy",
                "rules[3].target: the failover action takes no target",
                "rules[3].action: failover needs actions.failover.docker",
                r#"actions.wake.targets.gpu-host.mac: invalid MAC "zz:bb:cc:dd:ee:ff""#,
                r#"actions.wake.targets.gpu-host.broadcast: invalid IP address "192.168.0.300""#,
                "actions.wake.targets.gpu-host.port: must be 1..65535",
                "actions.repair.max_attempts: must be at least 1",
                r#"actions.repair.kubernetes.deployments[0]: expected namespace/name, got "ollama""#,
            ]
        );
    }

    #[test]
    fn button_problems_are_reported_with_their_paths() {
        let text = r#"
host: gpu-box
actions:
  wake:
    targets:
      nas: {mac: "aa:bb:cc:dd:ee:ff"}
  notify:
    buttons:
      url: "gpu-box:9471"
      key_file: /etc/aistack/buttons.key
      ttl: 10s
      offer:
        - {label: Wake, action: wake}
        - {match: {alertname: A}, label: "", action: notify}
        - {match: {alertname: A}, label: Wake the printer, action: wake, target: printer}
        - {match_re: {alertname: "(A"}, label: Repair, action: repair}
        - {match: {alertname: A}, label: Fail back, action: failback}
        - {match: {alertname: A}, label: "Wake {target}", action: wake}
"#;
        assert_eq!(
            problems_in(text),
            [
                "actions.notify.buttons: buttons go on notifications: they need actions.notify.ntfy",
                r#"actions.notify.buttons.url: invalid URL "gpu-box:9471": expected http://host[:port][/path] or https://..."#,
                "actions.notify.buttons.ttl: must be 1m to 30d",
                "actions.notify.buttons.offer[0].match: an offer needs `match` or `match_re`",
                "actions.notify.buttons.offer[1].label: must be 1 to 40 characters",
                "actions.notify.buttons.offer[1].action: a button cannot run notify",
                "actions.notify.buttons.offer[1].action: notify needs actions.notify.ntfy",
                r#"actions.notify.buttons.offer[2].target: "printer" is not in the wake allowlist (nas)"#,
                r#"actions.notify.buttons.offer[3].match_re.alertname: invalid regex "(A": unclosed group"#,
                "actions.notify.buttons.offer[3].target: a repair button needs `target` or `target_label`",
                "actions.notify.buttons.offer[4].action: failback needs actions.failover.docker",
            ]
        );
    }

    #[test]
    fn a_button_key_must_be_long_enough_to_sign_with() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("buttons.key");
        let text = format!(
            "actions:\n  notify:\n    ntfy: {{topic: t}}\n    buttons: {{url: \"http://gpu-box:9471\", key_file: {}}}\n",
            key.display()
        );
        let config: Config = parse(&text).unwrap_or_else(|p| panic!("{p:#?}"));
        let problems = |config: &Config| {
            let mut problems = Problems::default();
            config.check_files(&mut problems);
            problems
                .into_vec()
                .into_iter()
                .map(|p| p.to_string())
                .filter(|p| p.starts_with("actions.notify.buttons"))
                .collect::<Vec<_>>()
        };
        assert!(
            problems(&config)[0].contains("cannot read"),
            "{:?}",
            problems(&config)
        );
        std::fs::write(&key, "short\n").unwrap();
        assert_eq!(
            problems(&config),
            [format!(
                "actions.notify.buttons.key_file: {} holds 5 characters; a signing key needs at least 32 (openssl rand -hex 32)",
                key.display()
            )]
        );
        std::fs::write(&key, format!("{}\n", "ab".repeat(32))).unwrap();
        assert!(problems(&config).is_empty());
        assert_eq!(
            config.actions.notify.buttons.unwrap().ttl,
            HumanDuration::from_secs(12 * 3600)
        );
    }

    #[test]
    fn secret_files_must_exist_and_hold_something() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        let mut config = Config::default();
        config.auth.bearer_token_file = token.clone();
        let problems = |config: &Config| {
            let mut problems = Problems::default();
            config.check_files(&mut problems);
            problems
                .into_vec()
                .into_iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
        };
        let missing = problems(&config);
        assert_eq!(missing.len(), 1);
        assert!(
            missing[0].starts_with("auth.bearer_token_file: cannot read "),
            "{missing:?}"
        );
        std::fs::write(&token, "\n").unwrap();
        assert_eq!(
            problems(&config),
            [format!(
                "auth.bearer_token_file: {} is empty",
                token.display()
            )]
        );
        std::fs::write(&token, "s3cret\n").unwrap();
        assert!(problems(&config).is_empty());
    }
}
