//! The actioner's config file (`/etc/aistack/actioner.yaml` by default): the top-level keys,
//! the rules, and the checks that span sections. Each action's own settings live with the
//! action (`actions/<name>.rs`) and check themselves.
//!
//! Targets (hosts, MACs, containers, deployments) come only from the allowlists here; an alert's
//! label may select among them, never define one. `validate` checks every rule and button
//! against them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use aistack_common::config::{HumanDuration, Problems, Validate, check_http_url, check_regex};
use serde::Deserialize;

use crate::actions::failover::FailoverConfig;
use crate::actions::notify::NotifyConfig;
use crate::actions::repair::RepairConfig;
use crate::actions::suspend::SuspendConfig;
use crate::actions::wake::WakeConfig;
use crate::alert::anchored;
use crate::vocab::{ActionKind, Allowlists};

pub use aistack_common::docker::DockerConfig;

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
    /// The exporter, for re-checks at action time (default `http://127.0.0.1:9470`); with
    /// `{node}` in it, the exporter of the node the run is about (see [`crate::exporter`]).
    pub exporter_url: String,
    /// With `{node}` in `exporter_url`: nodes a failback re-checks besides the run's own, so
    /// one vLLM/Ollama pair for the cluster comes back only when no GPU node has a game.
    pub gpu_nodes: Vec<String>,
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
    /// Leader election among replicas (Kubernetes): only the Lease's holder acts.
    pub ha: Option<crate::ha::HaConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            host: None,
            state_dir: PathBuf::from("/var/lib/aistack/actioner"),
            dry_run: false,
            exporter_url: "http://127.0.0.1:9470".into(),
            gpu_nodes: Vec::new(),
            ha: None,
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
    /// The journal's current file is archived past this size (default 16 MiB).
    pub journal_max_bytes: u64,
    /// Archived journal files kept (default 4).
    pub journal_keep: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let journal = crate::journal::JournalLimits::default();
        Self {
            max_body_bytes: 1 << 20,
            journal_max_bytes: journal.max_bytes,
            journal_keep: journal.keep,
        }
    }
}

impl LimitsConfig {
    /// The journal's limits.
    pub fn journal(&self) -> crate::journal::JournalLimits {
        crate::journal::JournalLimits {
            max_bytes: self.journal_max_bytes,
            keep: self.journal_keep,
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

impl Config {
    /// This host's name: `host`, else the kernel's hostname.
    pub fn host_name(&self) -> String {
        self.host.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "localhost".into())
        })
    }

    /// The targets each action may act on.
    pub fn allowlists(&self) -> Allowlists {
        Allowlists {
            wake: self.actions.wake.targets.keys().cloned().collect(),
            repair: self.actions.repair.targets().collect(),
            host: self.host_name(),
            failover: self.actions.failover.nodes.keys().cloned().collect(),
        }
    }

    /// Checks the files the config names: the bearer token (required) and every other secret
    /// file exist, hold something, and are not readable by everyone (group-readable is fine:
    /// Alertmanager may share the token through a group). Reads them but keeps nothing.
    pub fn check_files(&self, problems: &mut Problems) {
        let mut secret = |key: &str, file: &Path, min_len: usize| {
            if let Some(problem) = secret_file_problem(file, min_len) {
                problems.push(key, problem);
            }
        };
        secret("auth.bearer_token_file", &self.auth.bearer_token_file, 1);
        if let Some(basic) = &self.auth.basic {
            secret("auth.basic.password_file", &basic.password_file, 1);
        }
        if let Some(key_file) = &self.actions.wake.key_file {
            secret("actions.wake.key_file", key_file, 1);
        }
        if let Some(token) = self
            .actions
            .notify
            .ntfy
            .as_ref()
            .and_then(|n| n.token_file.as_ref())
        {
            secret("actions.notify.ntfy.token_file", token, 1);
        }
        if let Some(buttons) = &self.actions.notify.buttons {
            secret("actions.notify.buttons.key_file", &buttons.key_file, 32);
        }
    }
}

/// What is wrong with a secret file, if anything.
fn secret_file_problem(file: &Path, min_len: usize) -> Option<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let shown = file.display();
    let mode = match std::fs::metadata(file) {
        Ok(meta) => meta.permissions().mode() & 0o7777,
        Err(err) => return Some(format!("cannot read {shown}: {err}")),
    };
    if mode & 0o006 != 0 {
        let what = if mode & 0o004 != 0 {
            "readable"
        } else {
            "writable"
        };
        return Some(format!(
            "{shown} is {what} by everyone (mode {mode:04o}); run chmod o-rwx {shown} (mode 0600, or 0640 to share it with a group)"
        ));
    }
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(err) => return Some(format!("cannot read {shown}: {err}")),
    };
    let len = text.trim().len();
    if len == 0 {
        Some(format!("{shown} is empty"))
    } else if len < min_len {
        Some(format!(
            "{shown} holds {len} characters; a signing key needs at least {min_len} (openssl rand -hex 32)"
        ))
    } else {
        None
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
        if let Some(ha) = &self.ha {
            ha.validate(problems);
        }
        let exporter = crate::exporter::ExporterUrl::new(&self.exporter_url);
        check_http_url(problems, "exporter_url", &exporter.example());
        for (i, node) in self.gpu_nodes.iter().enumerate() {
            problems.check(
                crate::exporter::valid_node(node),
                format!("gpu_nodes[{i}]"),
                format!("{node:?} is not a host name or an IP address"),
            );
        }
        if !self.gpu_nodes.is_empty() && !exporter.per_node() {
            problems.push(
                "gpu_nodes",
                "needs {node} in exporter_url (without it every re-check asks the one exporter)",
            );
        }
        if !self.actions.failover.nodes.is_empty() {
            problems.check(
                exporter.per_node(),
                "actions.failover.nodes",
                "needs {node} in exporter_url: each pair's failback re-checks its own node's exporter",
            );
            problems.check(
                self.gpu_nodes.is_empty(),
                "gpu_nodes",
                "is for one pair for the cluster; with actions.failover.nodes each pair re-checks its own node",
            );
        }
        if exporter.per_node()
            && let Some(host) = &self.host
        {
            problems.check(
                crate::exporter::valid_node(host),
                "host",
                format!("{host:?} cannot name this node in exporter_url's {{node}} (suspend re-checks there)"),
            );
        }
        problems.check(
            self.limits.max_body_bytes >= 1024,
            "limits.max_body_bytes",
            "must be at least 1024",
        );
        problems.check(
            self.limits.journal_max_bytes >= 64 * 1024,
            "limits.journal_max_bytes",
            "must be at least 65536",
        );
        problems.check(
            (1..=100).contains(&self.limits.journal_keep),
            "limits.journal_keep",
            "must be 1 to 100",
        );
        self.validate_rules(problems);
        self.validate_durations(problems);
        self.actions.wake.validate(problems);
        self.actions.failover.validate(problems);
        self.actions.repair.validate(problems);
        self.actions.notify.validate(problems);
        self.validate_offers(problems);
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

    /// Durations past a year are typos (and would not fit in time arithmetic).
    fn validate_durations(&self, problems: &mut Problems) {
        const YEAR: std::time::Duration = std::time::Duration::from_secs(365 * 86_400);
        let mut check = |path: String, duration: Option<HumanDuration>| {
            if let Some(d) = duration {
                problems.check(d.0 <= YEAR, path, "must be at most a year (365d)");
            }
        };
        for (i, rule) in self.rules.iter().enumerate() {
            check(format!("rules[{i}].cooldown"), rule.cooldown);
        }
        let actions = &self.actions;
        check(
            "actions.suspend.resume_grace".into(),
            Some(actions.suspend.resume_grace),
        );
        check("actions.repair.window".into(), Some(actions.repair.window));
        check(
            "actions.repair.healthy_timeout".into(),
            Some(actions.repair.healthy_timeout),
        );
        check(
            "actions.failover.fallback_timeout".into(),
            Some(actions.failover.fallback_timeout),
        );
        check(
            "actions.failover.primary_timeout".into(),
            Some(actions.failover.primary_timeout),
        );
    }

    fn validate_offers(&self, problems: &mut Problems) {
        let Some(buttons) = &self.actions.notify.buttons else {
            return;
        };
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
        match (self.allowlists().of(action), target) {
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
        if target_label.is_some() && !self.allowlists().takes_target(action) {
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
        if action.moves_backend()
            && let Some(section) = self.actions.failover.missing_section()
        {
            problems.push(
                at("action"),
                format!("{action} needs actions.failover.{section}"),
            );
        }
    }
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
        check_regex(
            problems,
            at(&format!("match_re.{label}")),
            pattern,
            anchored,
        );
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
mod tests;
