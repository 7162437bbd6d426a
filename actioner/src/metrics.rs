//! The actioner's own metrics (prefix `aistack_actioner_`), updated as things happen.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

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

/// `action` and `result` labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ResultLabels {
    /// The action.
    pub action: String,
    /// ok, failed, skipped or dry_run.
    pub result: &'static str,
}

/// `action` label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ActionLabel {
    /// The action.
    pub action: String,
}

/// `target` label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TargetLabel {
    /// The target.
    pub target: String,
}

/// `backend` label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct BackendLabel {
    /// primary or fallback.
    pub backend: &'static str,
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
    /// `actions_total{action,result}`.
    pub actions: Family<ResultLabels, Counter>,
    /// `action_duration_seconds{action}`.
    pub action_duration: Family<ActionLabel, Histogram>,
    /// `alert_to_action_seconds{action}`.
    pub alert_to_action: Family<ActionLabel, Histogram>,
    /// `inference_backend{backend}`.
    pub inference_backend: Family<BackendLabel, Gauge>,
    /// `paused`.
    pub paused: Gauge,
    /// `repair_exhausted{target}`.
    pub repair_exhausted: Family<TargetLabel, Gauge>,
    /// When each exhausted target gets its repair budget back.
    exhausted_until: Arc<Mutex<HashMap<String, Instant>>>,
    /// What `/metrics` encodes.
    pub registry: Arc<Registry>,
}

impl Metrics {
    /// Registers everything under the `aistack` prefix.
    pub fn new() -> Self {
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
        let inference_backend = Family::<BackendLabel, Gauge>::default();
        registry.register(
            "actioner_inference_backend",
            "1 for the inference backend in use (primary or fallback), 0 for the other.",
            inference_backend.clone(),
        );
        let paused = Gauge::default();
        registry.register(
            "actioner_paused",
            "1 while automatic actions are paused.",
            paused.clone(),
        );
        let repair_exhausted = Family::<TargetLabel, Gauge>::default();
        registry.register(
            "actioner_repair_exhausted",
            "1 when repairs of the target reached max_attempts within the window and it was left to a person.",
            repair_exhausted.clone(),
        );
        Self {
            webhooks,
            actions,
            action_duration,
            alert_to_action,
            inference_backend,
            paused,
            repair_exhausted,
            exhausted_until: Arc::default(),
            registry: Arc::new(registry),
        }
    }

    /// Creates `actions_total` at 0 for every result of each of `actions`.
    pub fn init_actions<'a>(&self, actions: impl IntoIterator<Item = &'a str>) {
        for action in actions {
            for result in ["ok", "failed", "skipped", "dry_run"] {
                drop(self.actions.get_or_create(&ResultLabels {
                    action: action.to_owned(),
                    result,
                }));
            }
        }
    }

    /// Counts a run's result.
    pub fn count(&self, action: &str, result: &'static str) {
        self.actions
            .get_or_create(&ResultLabels {
                action: action.to_owned(),
                result,
            })
            .inc();
    }

    /// Marks a repair target as exhausted for `left`, the time until its oldest counted repair
    /// leaves the window and a repair may be planned again; then the gauge drops by itself.
    /// Needs a Tokio runtime.
    pub fn set_repair_exhausted_for(&self, target: &str, left: Duration) {
        let until = Instant::now() + left;
        self.exhausted_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(target.to_owned(), until);
        self.exhausted_gauge(target).set(1);
        let metrics = self.clone();
        let target = target.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep_until(until).await;
            let mut pending = metrics
                .exhausted_until
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // A later exhaustion moved the deadline: that one's timer clears it.
            if pending.get(&target).is_some_and(|u| *u <= Instant::now()) {
                pending.remove(&target);
                metrics.exhausted_gauge(&target).set(0);
            }
        });
    }

    /// The target needs no repair any more (repaired, healthy again, or stopped on purpose).
    pub fn clear_repair_exhausted(&self, target: &str) {
        let mut pending = self
            .exhausted_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if pending.remove(target).is_some() {
            self.exhausted_gauge(target).set(0);
        }
    }

    fn exhausted_gauge(&self, target: &str) -> Gauge {
        self.repair_exhausted
            .get_or_create(&TargetLabel {
                target: target.to_owned(),
            })
            .clone()
    }

    /// Sets the backend gauges.
    pub fn set_backend(&self, fallback: bool) {
        for (backend, active) in [("primary", !fallback), ("fallback", fallback)] {
            self.inference_backend
                .get_or_create(&BackendLabel { backend })
                .set(i64::from(active));
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exhausted(metrics: &Metrics, target: &str) -> i64 {
        metrics.exhausted_gauge(target).get()
    }

    #[tokio::test(start_paused = true)]
    async fn an_exhausted_target_gets_its_budget_back_when_the_window_passes() {
        let metrics = Metrics::new();
        metrics.set_repair_exhausted_for("ollama", Duration::from_secs(600));
        assert_eq!(exhausted(&metrics, "ollama"), 1);
        tokio::time::sleep(Duration::from_secs(300)).await;
        assert_eq!(exhausted(&metrics, "ollama"), 1);
        // Exhausted again later: the first deadline no longer clears it.
        metrics.set_repair_exhausted_for("ollama", Duration::from_secs(600));
        tokio::time::sleep(Duration::from_secs(301)).await;
        assert_eq!(exhausted(&metrics, "ollama"), 1);
        tokio::time::sleep(Duration::from_secs(300)).await;
        assert_eq!(exhausted(&metrics, "ollama"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_repaired_target_is_cleared_at_once() {
        let metrics = Metrics::new();
        metrics.set_repair_exhausted_for("webui", Duration::from_secs(600));
        metrics.clear_repair_exhausted("webui");
        assert_eq!(exhausted(&metrics, "webui"), 0);
        // Clearing a target that never was exhausted creates no series.
        metrics.clear_repair_exhausted("other");
        let mut body = String::new();
        prometheus_client::encoding::text::encode(&mut body, &metrics.registry).unwrap();
        assert!(!body.contains("other"), "{body}");
    }

    #[test]
    fn every_action_a_rule_uses_starts_at_zero() {
        let metrics = Metrics::new();
        metrics.init_actions(["notify", "repair"]);
        let mut body = String::new();
        prometheus_client::encoding::text::encode(&mut body, &metrics.registry).unwrap();
        for line in [
            r#"aistack_actioner_actions_total{action="notify",result="failed"} 0"#,
            r#"aistack_actioner_actions_total{action="repair",result="ok"} 0"#,
        ] {
            assert!(body.contains(line), "{body}");
        }
        assert!(!body.contains(r#"action="suspend""#));
    }
}
