//! `notify`: pushes an alert to phones through ntfy's HTTP API (JSON publishing): a title from
//! the alert's name and summary, the priority from its severity, emoji tags, a Markdown body
//! with the description and links to the runbook, Alertmanager and Prometheus, and a click URL.
//! A resolved alert is published with the same sequence id, so ntfy 2.16+ updates the firing
//! notification in place (older servers show a second one that says "RESOLVED"). With
//! `actions.notify.buttons`, firing notifications carry signed buttons ([`crate::buttons`]).
//!
//! ntfy being slow or down never holds up another action: notify runs on its own, retries
//! 429 and 5xx answers and network errors with backoff (1 s, 2 s, 4 s) within its timeout, and
//! a failure is journaled like any other.

pub mod buttons;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aistack_common::config::{HumanDuration, Problems, check_http_url};
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use self::buttons::{Buttons, NtfyAction};
use super::{Action, ActionError, Job, RunContext, SetupError};
use crate::alert::{Alert, AlertStatus};
use crate::vocab::{ActionKind, cut_bytes};

/// `actions.notify`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotifyConfig {
    /// ntfy settings; without them, notify is unavailable.
    pub ntfy: Option<NtfyConfig>,
    /// Buttons on notifications that call back into this actioner; none without this.
    pub buttons: Option<ButtonsConfig>,
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

impl NotifyConfig {
    /// Problems with ntfy's settings and the buttons' own (paths under `actions.notify`);
    /// the offers are checked with the rules, against the allowlists.
    pub fn validate(&self, problems: &mut Problems) {
        if let Some(ntfy) = &self.ntfy {
            check_http_url(problems, "actions.notify.ntfy.url", &ntfy.url);
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
        let Some(buttons) = &self.buttons else { return };
        problems.check(
            self.ntfy.is_some(),
            "actions.notify.buttons",
            "buttons go on notifications: they need actions.notify.ntfy",
        );
        check_http_url(problems, "actions.notify.buttons.url", &buttons.url);
        problems.check(
            (60..=30 * 86_400).contains(&buttons.ttl.0.as_secs()),
            "actions.notify.buttons.ttl",
            "must be 1m to 30d",
        );
    }
}

/// ntfy's default message size limit; longer bodies would become attachments.
pub const MAX_MESSAGE_BYTES: usize = 4096;
/// Titles past this are cut (ntfy shows a line).
pub const MAX_TITLE_CHARS: usize = 200;

/// A ntfy JSON publish request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NtfyMessage {
    /// Topic.
    pub topic: String,
    /// Title.
    pub title: String,
    /// Markdown body.
    pub message: String,
    /// 1..5.
    pub priority: u8,
    /// Emoji short codes and words.
    pub tags: Vec<String>,
    /// The body is Markdown.
    pub markdown: bool,
    /// Opened when the notification is tapped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub click: Option<String>,
    /// Ties a firing and its resolution together (ntfy 2.16+ updates in place).
    pub sequence_id: String,
    /// Buttons that call back into this actioner (`actions.notify.buttons`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<NtfyAction>,
}

/// The notification for `alert`.
pub fn message_for(
    alert: &Alert,
    external_url: &str,
    topic: &str,
    priorities: &BTreeMap<String, u8>,
) -> NtfyMessage {
    let severity = alert.labels.get("severity").map_or("info", String::as_str);
    let summary = alert.annotations.get("summary").filter(|s| !s.is_empty());
    let resolved = alert.status == AlertStatus::Resolved;
    let state = if resolved { "RESOLVED" } else { "FIRING" };
    let name = if alert.name().is_empty() {
        "alert"
    } else {
        alert.name()
    };
    let title = match summary {
        Some(summary) => format!("[{state}] {name}: {summary}"),
        None => format!("[{state}] {name}"),
    };
    let title: String = title.chars().take(MAX_TITLE_CHARS).collect();

    let mut body = String::new();
    if let Some(summary) = summary {
        body.push_str(&format!("**{summary}**\n\n"));
    }
    if let Some(description) = alert
        .annotations
        .get("description")
        .filter(|d| !d.is_empty())
    {
        body.push_str(description);
        body.push_str("\n\n");
    }
    for label in [
        "host",
        "instance",
        "gpu",
        "container",
        "service",
        "interface",
    ] {
        if let Some(value) = alert.labels.get(label) {
            body.push_str(&format!("- {label}: `{value}`\n"));
        }
    }
    body.push_str(&format!(
        "- severity: {severity}\n- since: {}\n",
        alert.starts_at
    ));
    let mut links = Vec::new();
    if let Some(runbook) = alert
        .annotations
        .get("runbook_url")
        .filter(|r| !r.is_empty())
    {
        links.push(format!("[Runbook]({runbook})"));
    }
    if !external_url.is_empty() {
        links.push(format!(
            "[Alertmanager]({}/#/alerts)",
            external_url.trim_end_matches('/')
        ));
    }
    if !alert.generator_url.is_empty() {
        links.push(format!("[Prometheus]({})", alert.generator_url));
    }
    if !links.is_empty() {
        body.push('\n');
        body.push_str(&links.join(" · "));
    }

    let priority = priorities.get(severity).copied().unwrap_or(3);
    let tags = if resolved {
        vec!["white_check_mark".to_owned()]
    } else {
        let emoji = match severity {
            "critical" => "rotating_light",
            "warning" => "warning",
            _ => "information_source",
        };
        vec![emoji.to_owned()]
    };
    NtfyMessage {
        topic: topic.to_owned(),
        title,
        message: cut_bytes(&body, MAX_MESSAGE_BYTES).to_owned(),
        // A resolution is good news: never louder than default.
        priority: if resolved { priority.min(3) } else { priority },
        tags,
        markdown: true,
        click: alert
            .annotations
            .get("runbook_url")
            .filter(|r| !r.is_empty())
            .cloned()
            .or_else(|| (!alert.generator_url.is_empty()).then(|| alert.generator_url.clone())),
        sequence_id: format!("aistack-{}", cut_bytes(&alert.fingerprint, 48)),
        actions: Vec::new(),
    }
}

/// Publishes to ntfy.
#[derive(Debug)]
pub struct Notify {
    client: reqwest::Client,
    url: String,
    topic: String,
    token: Option<String>,
    priorities: BTreeMap<String, u8>,
    buttons: Option<Arc<Buttons>>,
    timeout: Duration,
}

impl Notify {
    /// Publishes to `config.url`, reading the token file once; `buttons` go on firing
    /// notifications.
    pub fn new(
        config: &NtfyConfig,
        buttons: Option<Arc<Buttons>>,
        timeout: Duration,
    ) -> Result<Self, SetupError> {
        let token = config
            .token_file
            .as_deref()
            .map(|path| {
                std::fs::read_to_string(path)
                    .map(|t| t.trim().to_owned())
                    .map_err(|source| SetupError::Secret {
                        path: path.to_owned(),
                        source,
                    })
            })
            .transpose()?;
        let client = aistack_common::http_client(|builder| {
            builder
                .user_agent(concat!("aistack-actioner/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(10))
        })?;
        Ok(Self {
            client,
            url: config.url.trim_end_matches('/').to_owned(),
            topic: config.topic.clone(),
            token,
            priorities: config.priorities.clone(),
            buttons,
            timeout,
        })
    }

    fn message(&self, job: &Job) -> NtfyMessage {
        match &job.alert {
            Some(alert) => NtfyMessage {
                actions: self
                    .buttons
                    .as_ref()
                    .map(|b| b.for_alert(alert, SystemTime::now()))
                    .unwrap_or_default(),
                ..message_for(alert, &job.external_url, &self.topic, &self.priorities)
            },
            None => NtfyMessage {
                topic: self.topic.clone(),
                title: "aistack: test notification".into(),
                message: "Sent by a manual trigger of the notify action.".into(),
                priority: 3,
                tags: vec!["bell".into()],
                markdown: true,
                click: None,
                sequence_id: format!("aistack-{}", job.key.as_str().replace([':', '|'], "-")),
                actions: Vec::new(),
            },
        }
    }

    async fn publish_once(&self, message: &NtfyMessage) -> Result<(), (bool, String)> {
        let mut request = self.client.post(&self.url).json(message);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        match request.send().await {
            Ok(response) if response.status().is_success() => Ok(()),
            Ok(response) => {
                let status = response.status();
                let retry = status.as_u16() == 429 || status.is_server_error();
                let body = response.text().await.unwrap_or_default();
                Err((
                    retry,
                    format!("ntfy answered {status}: {}", cut_bytes(body.trim(), 200)),
                ))
            }
            Err(err) => Err((true, format!("ntfy unreachable: {err}"))),
        }
    }
}

impl Action for Notify {
    fn kind(&self) -> ActionKind {
        ActionKind::Notify
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn concurrency(&self) -> usize {
        4
    }

    fn describe(&self, job: &Job) -> String {
        let m = self.message(job);
        format!(
            "would publish to {}/{} (priority {}): {}",
            self.url, m.topic, m.priority, m.title
        )
    }

    fn run<'a>(
        &'a self,
        job: &'a Job,
        _context: &'a RunContext,
    ) -> BoxFuture<'a, Result<String, ActionError>> {
        Box::pin(async move {
            let message = self.message(job);
            let mut delay = Duration::from_secs(1);
            let mut attempt = 1;
            loop {
                match self.publish_once(&message).await {
                    Ok(()) => {
                        return Ok(format!(
                            "published to {}/{} (attempt {attempt})",
                            self.url, message.topic
                        ));
                    }
                    Err((true, why)) if attempt < 4 => {
                        tracing::debug!(action = "notify", attempt, %why, "retrying");
                        tokio::time::sleep(delay).await;
                        delay *= 2;
                        attempt += 1;
                    }
                    Err((_, why)) => {
                        return Err(ActionError::Failed(format!("{why} (attempt {attempt})")));
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(status: AlertStatus) -> Alert {
        Alert {
            status,
            labels: [
                ("alertname", "AistackGpuHot"),
                ("severity", "critical"),
                ("instance", "gpu-box:9470"),
                ("gpu", "0"),
            ]
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect(),
            annotations: [
                ("summary", "GPU 0 at 91 °C"),
                ("description", "The GPU has been above 85 °C for 5 minutes."),
                (
                    "runbook_url",
                    "https://example.org/runbooks/AistackGpuHot.md",
                ),
            ]
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect(),
            starts_at: "2026-11-22T21:00:00Z".into(),
            ends_at: String::new(),
            generator_url: "http://prometheus:9090/graph?g0.expr=x".into(),
            fingerprint: "c0ffee1234567890".into(),
        }
    }

    fn priorities() -> BTreeMap<String, u8> {
        [("critical".to_owned(), 5), ("warning".to_owned(), 4)]
            .into_iter()
            .collect()
    }

    #[test]
    fn a_firing_critical_alert() {
        let m = message_for(
            &alert(AlertStatus::Firing),
            "http://am:9093/",
            "aistack",
            &priorities(),
        );
        assert_eq!(m.title, "[FIRING] AistackGpuHot: GPU 0 at 91 °C");
        assert_eq!(
            (m.priority, m.tags.as_slice()),
            (5, &["rotating_light".to_owned()][..])
        );
        assert!(
            m.message
                .starts_with("**GPU 0 at 91 °C**\n\nThe GPU has been above 85 °C"),
            "{}",
            m.message
        );
        assert!(m.message.contains("- gpu: `0`"));
        assert!(m.message.contains("[Runbook](https://example.org/runbooks/AistackGpuHot.md) · [Alertmanager](http://am:9093/#/alerts) · [Prometheus]("));
        assert_eq!(
            m.click.as_deref(),
            Some("https://example.org/runbooks/AistackGpuHot.md")
        );
        assert_eq!(m.sequence_id, "aistack-c0ffee1234567890");
        assert!(m.markdown);
    }

    #[test]
    fn its_resolution_says_so_quietly_in_the_same_sequence() {
        let m = message_for(&alert(AlertStatus::Resolved), "", "aistack", &priorities());
        assert!(m.title.starts_with("[RESOLVED] AistackGpuHot"));
        assert_eq!(m.priority, 3);
        assert_eq!(m.tags, ["white_check_mark"]);
        assert_eq!(m.sequence_id, "aistack-c0ffee1234567890");
        assert!(
            !m.message.contains("Alertmanager"),
            "no link without an external URL"
        );
    }

    #[test]
    fn limits_are_honoured_at_character_boundaries() {
        let mut a = alert(AlertStatus::Firing);
        a.annotations.insert("summary".into(), "é".repeat(500));
        a.annotations.insert("description".into(), "ü".repeat(5000));
        let m = message_for(&a, "", "aistack", &priorities());
        assert!(m.title.chars().count() <= MAX_TITLE_CHARS);
        assert!(m.message.len() <= MAX_MESSAGE_BYTES);
        let info = message_for(&alert(AlertStatus::Firing), "", "t", &BTreeMap::new());
        assert_eq!(
            info.priority, 3,
            "severities without a mapping get ntfy's default"
        );
    }
}
