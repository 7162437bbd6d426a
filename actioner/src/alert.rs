//! Alertmanager's webhook payload, version 4, and what the actioner reads from each alert.
//!
//! Each alert is judged on its own labels; the group's `commonLabels` and `groupLabels` are
//! never used to decide anything (an alert group can mix hosts and containers).

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// The body Alertmanager POSTs to a webhook receiver.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookPayload {
    /// Always "4".
    pub version: String,
    /// Identifies the alert group.
    #[serde(default)]
    pub group_key: String,
    /// Alerts left out because of the receiver's `max_alerts`.
    #[serde(default)]
    pub truncated_alerts: u64,
    /// `firing` or `resolved`, for the group.
    #[serde(default)]
    pub status: String,
    /// The receiver's name.
    #[serde(default)]
    pub receiver: String,
    /// Alertmanager's own URL, for links.
    #[serde(default, rename = "externalURL")]
    pub external_url: String,
    /// The alerts.
    pub alerts: Vec<Alert>,
}

/// One alert of a webhook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    /// `firing` or `resolved`.
    pub status: AlertStatus,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its annotations (summary, description, runbook_url).
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// When it started firing (RFC 3339).
    pub starts_at: String,
    /// When it resolved, or `0001-01-01T00:00:00Z` while firing.
    #[serde(default)]
    pub ends_at: String,
    /// Link to the expression in Prometheus.
    #[serde(default, rename = "generatorURL")]
    pub generator_url: String,
    /// Alertmanager's hash of the labels.
    pub fingerprint: String,
}

/// `firing` or `resolved`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertStatus {
    /// The alert fires.
    Firing,
    /// It resolved.
    Resolved,
}

impl AlertStatus {
    /// The label-style name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Firing => "firing",
            Self::Resolved => "resolved",
        }
    }
}

/// Limits on what one webhook may carry, against hostile or broken senders.
pub const MAX_ALERTS: usize = 1000;
/// Longest label or annotation (name and value together) accepted.
pub const MAX_VALUE_BYTES: usize = 16 * 1024;
/// Longest fingerprint accepted (Alertmanager sends 16 hex digits).
pub const MAX_FINGERPRINT_BYTES: usize = 128;
/// Longest timestamp accepted (RFC 3339 with nanoseconds and an offset is 35).
pub const MAX_TIMESTAMP_BYTES: usize = 64;
/// Longest URL accepted (`externalURL`, `generatorURL`).
pub const MAX_URL_BYTES: usize = 4096;
/// Longest receiver name or group status accepted.
pub const MAX_NAME_BYTES: usize = 256;
/// Longest group key accepted (the route's matchers and the group's labels).
pub const MAX_GROUP_KEY_BYTES: usize = 16 * 1024;

/// Why a payload is refused (answered with 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// Not JSON of the right shape.
    #[error("malformed webhook payload: {0}")]
    Malformed(String),
    /// A version this receiver does not speak.
    #[error("unsupported webhook version {0:?}, expected \"4\"")]
    Version(String),
    /// Too much of something.
    #[error("{0}")]
    TooLarge(String),
}

fn bounded(field: &str, value: &str, max: usize) -> Result<(), PayloadError> {
    if value.len() > max {
        return Err(PayloadError::TooLarge(format!(
            "{field} is {} bytes long, at most {max}",
            value.len()
        )));
    }
    Ok(())
}

/// Parses and checks a webhook body: every string has a bound, every alert a fingerprint and
/// a start time that parses.
pub fn parse_payload(body: &[u8]) -> Result<WebhookPayload, PayloadError> {
    let payload: WebhookPayload =
        serde_json::from_slice(body).map_err(|e| PayloadError::Malformed(e.to_string()))?;
    if payload.version != "4" {
        return Err(PayloadError::Version(
            payload.version.chars().take(16).collect(),
        ));
    }
    if payload.alerts.len() > MAX_ALERTS {
        return Err(PayloadError::TooLarge(format!(
            "{} alerts in one webhook, at most {MAX_ALERTS}",
            payload.alerts.len()
        )));
    }
    bounded("groupKey", &payload.group_key, MAX_GROUP_KEY_BYTES)?;
    bounded("status", &payload.status, MAX_NAME_BYTES)?;
    bounded("receiver", &payload.receiver, MAX_NAME_BYTES)?;
    bounded("externalURL", &payload.external_url, MAX_URL_BYTES)?;
    for alert in &payload.alerts {
        let too_long = alert
            .labels
            .iter()
            .chain(&alert.annotations)
            .find(|(k, v)| k.len() + v.len() > MAX_VALUE_BYTES);
        if let Some((key, _)) = too_long {
            let key: String = key.chars().take(64).collect();
            return Err(PayloadError::TooLarge(format!(
                "label or annotation {key:?} longer than {MAX_VALUE_BYTES} bytes"
            )));
        }
        if alert.fingerprint.is_empty() || alert.starts_at.is_empty() {
            return Err(PayloadError::Malformed(
                "an alert without fingerprint or startsAt".into(),
            ));
        }
        bounded("fingerprint", &alert.fingerprint, MAX_FINGERPRINT_BYTES)?;
        bounded("startsAt", &alert.starts_at, MAX_TIMESTAMP_BYTES)?;
        bounded("endsAt", &alert.ends_at, MAX_TIMESTAMP_BYTES)?;
        bounded("generatorURL", &alert.generator_url, MAX_URL_BYTES)?;
        if alert.started().is_none() {
            return Err(PayloadError::Malformed(format!(
                "startsAt {:?} is not an RFC 3339 time",
                alert.starts_at
            )));
        }
    }
    Ok(payload)
}

/// `match` and `match_re` of a rule or a button offer, compiled: an alert matches when each
/// `match` label has that value and each `match_re` label matches its anchored regex (a
/// missing label is the empty string, as in Alertmanager).
#[derive(Debug)]
pub struct LabelMatcher {
    equal: Vec<(String, String)>,
    regex: Vec<(String, regex::Regex)>,
}

impl LabelMatcher {
    /// Compiles `match_re` (validated by check-config: the regexes compile).
    pub fn new(
        equal: &BTreeMap<String, String>,
        regex: &BTreeMap<String, String>,
    ) -> Result<Self, regex::Error> {
        Ok(Self {
            equal: equal.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            regex: regex
                .iter()
                .map(|(label, pattern)| Ok((label.clone(), regex::Regex::new(&anchored(pattern))?)))
                .collect::<Result<_, regex::Error>>()?,
        })
    }

    /// Whether `alert`'s own labels match.
    pub fn matches(&self, alert: &Alert) -> bool {
        let value = |label: &str| alert.labels.get(label).map_or("", String::as_str);
        self.equal.iter().all(|(label, want)| value(label) == want)
            && self
                .regex
                .iter()
                .all(|(label, re)| re.is_match(value(label)))
    }
}

/// A `match_re` value anchored at both ends, as Alertmanager reads it.
pub fn anchored(pattern: &str) -> String {
    format!("^(?:{pattern})$")
}

impl Alert {
    /// `alertname`, or "" when missing.
    pub fn name(&self) -> &str {
        self.labels.get("alertname").map_or("", String::as_str)
    }

    /// The host the alert is about: its `host` label, else the host part of `instance`
    /// (`gpu-box:9470` -> `gpu-box`, `[::1]:9470` -> `::1`).
    pub fn host(&self) -> Option<String> {
        if let Some(host) = self.labels.get("host").filter(|h| !h.is_empty()) {
            return Some(host.clone());
        }
        let instance = self.labels.get("instance").filter(|i| !i.is_empty())?;
        if let Some(rest) = instance.strip_prefix('[') {
            return rest.split_once(']').map(|(h, _)| h.to_owned());
        }
        Some(match instance.rsplit_once(':') {
            Some((host, port))
                if port.bytes().all(|b| b.is_ascii_digit()) && !host.contains(':') =>
            {
                host.to_owned()
            }
            _ => instance.clone(),
        })
    }

    /// Roughly how many bytes it holds (labels, annotations, strings).
    pub fn size_bytes(&self) -> usize {
        let strings = self
            .labels
            .iter()
            .chain(&self.annotations)
            .map(|(k, v)| k.len() + v.len() + 64)
            .sum::<usize>();
        strings
            + self.starts_at.len()
            + self.ends_at.len()
            + self.generator_url.len()
            + self.fingerprint.len()
            + 256
    }

    /// When it started, when Alertmanager's timestamp parses.
    pub fn started(&self) -> Option<SystemTime> {
        humantime::parse_rfc3339_weak(&self.starts_at).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(labels: &[(&str, &str)]) -> Alert {
        Alert {
            status: AlertStatus::Firing,
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            annotations: BTreeMap::new(),
            starts_at: "2026-11-22T21:00:00.123456789Z".into(),
            ends_at: "0001-01-01T00:00:00Z".into(),
            generator_url: String::new(),
            fingerprint: "abc".into(),
        }
    }

    #[test]
    fn the_host_comes_from_host_else_instance() {
        assert_eq!(
            alert(&[("host", "gpu-box"), ("instance", "other:9470")])
                .host()
                .as_deref(),
            Some("gpu-box")
        );
        assert_eq!(
            alert(&[("instance", "gpu-box:9470")]).host().as_deref(),
            Some("gpu-box")
        );
        assert_eq!(
            alert(&[("instance", "gpu-box")]).host().as_deref(),
            Some("gpu-box")
        );
        assert_eq!(
            alert(&[("instance", "[fd00::1]:9470")]).host().as_deref(),
            Some("fd00::1")
        );
        assert_eq!(
            alert(&[("instance", "10.0.0.5:9470")]).host().as_deref(),
            Some("10.0.0.5")
        );
        assert_eq!(alert(&[("job", "x")]).host(), None);
    }

    #[test]
    fn start_times_parse_with_nanoseconds() {
        let started = alert(&[]).started().unwrap();
        assert_eq!(
            humantime::format_rfc3339_seconds(started).to_string(),
            "2026-11-22T21:00:00Z"
        );
    }

    fn fixture(name: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/alertmanager")
            .join(name);
        std::fs::read(path).unwrap()
    }

    #[test]
    fn payloads_captured_from_alertmanager_parse() {
        let single = parse_payload(&fixture("single-firing.json")).unwrap();
        assert_eq!(single.alerts.len(), 1);
        let a = &single.alerts[0];
        assert_eq!(
            (a.name(), a.status, a.host().as_deref()),
            ("AistackGpuHot", AlertStatus::Firing, Some("gpu-box"))
        );
        assert_eq!(a.annotations["summary"], "GPU 0 at 91 °C");
        assert!(a.started().is_some());
        assert_eq!(single.external_url, "http://vm:19801");

        let grouped = parse_payload(&fixture("grouped-firing.json")).unwrap();
        let containers: Vec<&str> = grouped
            .alerts
            .iter()
            .map(|a| a.labels["container"].as_str())
            .collect();
        assert_eq!(containers, ["ollama", "open-webui"]);

        let mixed = parse_payload(&fixture("mixed-resolved-firing.json")).unwrap();
        assert_eq!(mixed.status, "firing", "the group says firing ...");
        let statuses: Vec<AlertStatus> = mixed.alerts.iter().map(|a| a.status).collect();
        assert_eq!(
            statuses,
            [AlertStatus::Resolved, AlertStatus::Firing],
            "... its alerts say otherwise"
        );
    }

    #[test]
    fn payloads_are_checked() {
        let ok = br#"{"version":"4","status":"firing","alerts":[{"status":"firing","labels":{"alertname":"X"},"annotations":{},"startsAt":"2026-11-22T21:00:00Z","endsAt":"0001-01-01T00:00:00Z","fingerprint":"f1"}]}"#;
        assert_eq!(parse_payload(ok).unwrap().alerts[0].name(), "X");
        assert!(matches!(
            parse_payload(b"{"),
            Err(PayloadError::Malformed(_))
        ));
        assert!(matches!(
            parse_payload(b"[]"),
            Err(PayloadError::Malformed(_))
        ));
        assert!(matches!(
            parse_payload(br#"{"version":"3","alerts":[]}"#),
            Err(PayloadError::Version(_))
        ));
        let wrong_type = br#"{"version":"4","alerts":[{"status":"firing","labels":{"a":1},"startsAt":"x","fingerprint":"f"}]}"#;
        assert!(matches!(
            parse_payload(wrong_type),
            Err(PayloadError::Malformed(_))
        ));
        let bad_status = br#"{"version":"4","alerts":[{"status":"burning","labels":{},"startsAt":"x","fingerprint":"f"}]}"#;
        assert!(matches!(
            parse_payload(bad_status),
            Err(PayloadError::Malformed(_))
        ));
        let huge = format!(
            r#"{{"version":"4","alerts":[{{"status":"firing","labels":{{"x":"{}"}},"startsAt":"x","fingerprint":"f"}}]}}"#,
            "a".repeat(MAX_VALUE_BYTES + 1)
        );
        assert!(matches!(
            parse_payload(huge.as_bytes()),
            Err(PayloadError::TooLarge(_))
        ));
        let long_fingerprint = format!(
            r#"{{"version":"4","alerts":[{{"status":"firing","labels":{{}},"startsAt":"2026-11-22T21:00:00Z","fingerprint":"{}"}}]}}"#,
            "f".repeat(MAX_FINGERPRINT_BYTES + 1)
        );
        assert!(matches!(
            parse_payload(long_fingerprint.as_bytes()),
            Err(PayloadError::TooLarge(_))
        ));
        let long_url = format!(
            r#"{{"version":"4","externalURL":"http://{}","alerts":[]}}"#,
            "a".repeat(MAX_URL_BYTES)
        );
        assert!(matches!(
            parse_payload(long_url.as_bytes()),
            Err(PayloadError::TooLarge(_))
        ));
        let not_a_time = br#"{"version":"4","alerts":[{"status":"firing","labels":{},"startsAt":"soon","fingerprint":"f"}]}"#;
        assert!(matches!(
            parse_payload(not_a_time),
            Err(PayloadError::Malformed(_))
        ));
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(
            parse_payload(deep.as_bytes()).is_err(),
            "deep nesting is refused, not a stack overflow"
        );
    }
}
