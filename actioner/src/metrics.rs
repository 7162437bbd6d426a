//! The actioner's own metrics (prefix `aistack_actioner_`): counters and histograms updated as
//! things happen, and gauges read from the ledger's latest snapshot at each scrape (pause, the
//! backend, exhausted repair targets, whether the journal can be written).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tokio::sync::watch;

use crate::ledger::Snapshot;
use crate::vocab::{ActionKind, Backend};

/// `aistack_actioner_leader`'s help, also what a follower serves (`crate::ha`).
pub const LEADER_HELP: &str = "1 on the replica that acts (the holder of the lease, or an actioner without ha), 0 on a follower.";

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    revision: &'static str,
}

/// `code` label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CodeLabel {
    /// HTTP status code.
    pub code: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabels {
    action: &'static str,
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ActionLabel {
    action: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

fn duration_histogram() -> Histogram {
    Histogram::new([
        0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0,
    ])
}

fn latency_histogram() -> Histogram {
    Histogram::new([5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0])
}

/// Handles to every metric; cheap to clone.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// `webhooks_total{code}`.
    pub webhooks: Family<CodeLabel, Counter>,
    actions: Family<ResultLabels, Counter>,
    action_duration: Family<ActionLabel, Histogram>,
    alert_to_action: Family<ActionLabel, Histogram>,
    journal_errors: Family<OpLabel, Counter>,
    journal_lines_skipped: Counter,
    relay_refused: Family<ReasonLabel, Counter>,
    /// What `/metrics` encodes.
    pub registry: Arc<Registry>,
}

impl Metrics {
    /// Registers everything under the `aistack` prefix; the gauges read `ledger`.
    pub fn new(ledger: watch::Receiver<Arc<Snapshot>>) -> Self {
        let mut registry = Registry::with_prefix("aistack");
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: aistack_common::VERSION,
                revision: aistack_common::REVISION,
            })
            .set(1);
        registry.register(
            "actioner_build_info",
            "Version and git revision of aistack-actioner; always 1.",
            build,
        );
        // A running recorder acts: this replica leads (a follower serves its own 0).
        let leader = Gauge::<i64>::default();
        leader.set(1);
        registry.register("actioner_leader", LEADER_HELP, leader);
        let webhooks = Family::<CodeLabel, Counter>::default();
        registry.register(
            "actioner_webhooks",
            "Alertmanager webhooks answered, by HTTP status code.",
            webhooks.clone(),
        );
        let actions = Family::<ResultLabels, Counter>::default();
        registry.register(
            "actioner_actions",
            "Action runs, by action and result (ok, failed, skipped, dry_run).",
            actions.clone(),
        );
        let action_duration = Family::<ActionLabel, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        registry.register_with_unit(
            "actioner_action_duration",
            "How long action runs took.",
            Unit::Seconds,
            action_duration.clone(),
        );
        let alert_to_action = Family::<ActionLabel, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register_with_unit(
            "actioner_alert_to_action",
            "Time from an alert's startsAt to its action's end.",
            Unit::Seconds,
            alert_to_action.clone(),
        );
        let journal_errors = Family::<OpLabel, Counter>::default();
        registry.register(
            "actioner_journal_errors",
            "Journal operations that failed (write: the webhook was answered 500; rotate: retried at the next write).",
            journal_errors.clone(),
        );
        let journal_lines_skipped = Counter::default();
        registry.register(
            "actioner_journal_lines_skipped",
            "Journal lines skipped when it was read back at start: torn by a crash, unreadable or repeated.",
            journal_lines_skipped.clone(),
        );
        let relay_refused = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "actioner_wake_relay_refused",
            "Wake relay requests refused before the journal: rate_limited or destination (not a broadcast address or port the relay allows).",
            relay_refused.clone(),
        );
        registry.register_collector(Box::new(LedgerGauges { ledger }));
        Self {
            webhooks,
            actions,
            action_duration,
            alert_to_action,
            journal_errors,
            journal_lines_skipped,
            relay_refused,
            registry: Arc::new(registry),
        }
    }

    /// Creates `actions_total` at 0 for every result of each of `actions`.
    pub fn init_actions(&self, actions: impl IntoIterator<Item = ActionKind>) {
        for action in actions {
            for result in ["ok", "failed", "skipped", "dry_run"] {
                drop(self.actions.get_or_create(&ResultLabels {
                    action: action.name(),
                    result,
                }));
            }
        }
    }

    /// Counts a run's result.
    pub fn count(&self, action: ActionKind, result: &'static str) {
        self.actions
            .get_or_create(&ResultLabels {
                action: action.name(),
                result,
            })
            .inc();
    }

    /// Records how long a run took.
    pub fn observe_duration(&self, action: ActionKind, took: Duration) {
        self.action_duration
            .get_or_create(&ActionLabel {
                action: action.name(),
            })
            .observe(took.as_secs_f64());
    }

    /// Records how long after its alert started a run ended.
    pub fn observe_alert_to_action(&self, action: ActionKind, age: Duration) {
        self.alert_to_action
            .get_or_create(&ActionLabel {
                action: action.name(),
            })
            .observe(age.as_secs_f64());
    }

    /// Counts a failed journal operation (`write`, `rotate`).
    pub fn journal_error(&self, op: &'static str) {
        self.journal_errors.get_or_create(&OpLabel { op }).inc();
    }

    /// Counts journal lines skipped at start.
    pub fn journal_lines_skipped(&self, lines: u64) {
        self.journal_lines_skipped.inc_by(lines);
    }

    /// Counts a relay request refused before the journal.
    pub fn relay_refused(&self, reason: &'static str) {
        self.relay_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }
}

/// The gauges read from the ledger's snapshot at each scrape.
#[derive(Debug)]
struct LedgerGauges {
    ledger: watch::Receiver<Arc<Snapshot>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BackendLabel {
    backend: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct NodeBackendLabel {
    node: String,
    backend: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TargetLabel {
    target: String,
}

fn flag(on: bool) -> i64 {
    i64::from(on)
}

impl Collector for LedgerGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let snapshot = self.ledger.borrow().clone();
        let now = SystemTime::now();
        let mut backend = encoder.encode_descriptor(
            "actioner_inference_backend",
            "1 for the inference backend in use (primary or fallback), 0 for the other; with a pair per GPU node, per node (label node).",
            None,
            MetricType::Gauge,
        )?;
        if snapshot.node_backends.is_empty() {
            for b in [Backend::Primary, Backend::Fallback] {
                let gauge = ConstGauge::new(flag(snapshot.backend == b));
                gauge.encode(backend.encode_family(&BackendLabel {
                    backend: b.as_str(),
                })?)?;
            }
        }
        for (node, serving, _) in &snapshot.node_backends {
            for b in [Backend::Primary, Backend::Fallback] {
                let gauge = ConstGauge::new(flag(*serving == b));
                gauge.encode(backend.encode_family(&NodeBackendLabel {
                    node: node.clone(),
                    backend: b.as_str(),
                })?)?;
            }
        }
        ConstGauge::new(flag(snapshot.paused)).encode(encoder.encode_descriptor(
            "actioner_paused",
            "1 while automatic actions are paused.",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(flag(snapshot.journal_failure.is_none())).encode(
            encoder.encode_descriptor(
                "actioner_journal_writable",
                "1 while the journal takes writes; 0 after a write failed (webhooks are answered 500) until one succeeds.",
                None,
                MetricType::Gauge,
            )?,
        )?;
        if !snapshot.exhausted.is_empty() {
            let mut exhausted = encoder.encode_descriptor(
                "actioner_repair_exhausted",
                "1 when repairs of the target reached max_attempts within the window and it was left to a person.",
                None,
                MetricType::Gauge,
            )?;
            for (target, until) in &snapshot.exhausted {
                let on = until.is_some_and(|until| until > now);
                ConstGauge::new(flag(on)).encode(exhausted.encode_family(&TargetLabel {
                    target: target.clone(),
                })?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(metrics: &Metrics) -> String {
        let mut body = String::new();
        prometheus_client::encoding::text::encode(&mut body, &metrics.registry).unwrap();
        body
    }

    #[test]
    fn gauges_follow_the_ledger() {
        let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        let metrics = Metrics::new(rx);
        let body = encoded(&metrics);
        for line in [
            r#"aistack_actioner_inference_backend{backend="primary"} 1"#,
            r#"aistack_actioner_inference_backend{backend="fallback"} 0"#,
            "aistack_actioner_paused 0",
            "aistack_actioner_journal_writable 1",
        ] {
            assert!(body.contains(line), "{line}\n{body}");
        }
        assert!(!body.contains("repair_exhausted"), "{body}");
        let later = SystemTime::now() + Duration::from_secs(600);
        tx.send_replace(Arc::new(Snapshot {
            paused: true,
            backend: Backend::Fallback,
            exhausted: vec![("ollama".into(), Some(later)), ("webui".into(), None)],
            journal_failure: Some("ENOSPC".into()),
            ..Snapshot::default()
        }));
        let body = encoded(&metrics);
        for line in [
            r#"aistack_actioner_inference_backend{backend="fallback"} 1"#,
            "aistack_actioner_paused 1",
            "aistack_actioner_journal_writable 0",
            r#"aistack_actioner_repair_exhausted{target="ollama"} 1"#,
            r#"aistack_actioner_repair_exhausted{target="webui"} 0"#,
        ] {
            assert!(body.contains(line), "{line}\n{body}");
        }
    }

    #[test]
    fn every_action_a_rule_uses_starts_at_zero() {
        let (_tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        let metrics = Metrics::new(rx);
        metrics.init_actions([ActionKind::Notify, ActionKind::Repair]);
        let body = encoded(&metrics);
        for line in [
            r#"aistack_actioner_actions_total{action="notify",result="failed"} 0"#,
            r#"aistack_actioner_actions_total{action="repair",result="ok"} 0"#,
        ] {
            assert!(body.contains(line), "{body}");
        }
        assert!(!body.contains(r#"action="suspend""#));
    }
}
