//! Rules, compiled: which alerts trigger which action on which target.
//!
//! A rule matches an alert by its own labels (`match`: equality; `match_re`: anchored regexes,
//! a missing label matching as ""), and by its status (`on`). The target comes from the rule
//! (`target`) or a label (`target_label`) and must be in the action's allowlist; suspend acts
//! only for alerts about this host, wake defaults to the host the alert is about. What the
//! ledger says (once-only, pause, cooldowns) is the policy's part, not this module's.

use std::time::Duration;

use crate::alert::{Alert, AlertStatus, LabelMatcher};
use crate::config::{Config, Rule, Trigger};
use crate::vocab::{ActionKind, Allowlists, Origin, Plan, Skip};

/// The outcome of one rule for one alert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Act (subject to the policy: once-only, pause, cooldown, repair budget).
    Act(Plan),
    /// Matched, but will not act.
    Skip(Plan, Skip),
}

#[derive(Debug)]
struct Compiled {
    rule: Rule,
    matcher: LabelMatcher,
}

/// The compiled rules and the allowlists they pick targets from.
#[derive(Debug)]
pub struct RuleSet {
    rules: Vec<Compiled>,
    allowlists: Allowlists,
    dry_run: bool,
}

impl RuleSet {
    /// Compiles the config's rules (validated: the regexes compile).
    pub fn new(config: &Config) -> Result<Self, regex::Error> {
        let rules = config
            .rules
            .iter()
            .map(|rule| {
                Ok(Compiled {
                    rule: rule.clone(),
                    matcher: LabelMatcher::new(&rule.match_labels, &rule.match_re)?,
                })
            })
            .collect::<Result<_, regex::Error>>()?;
        Ok(Self {
            rules,
            allowlists: config.allowlists(),
            dry_run: config.dry_run,
        })
    }

    /// The allowlists targets come from.
    pub fn allowlists(&self) -> &Allowlists {
        &self.allowlists
    }

    /// The global `dry_run`.
    pub fn dry_run(&self) -> bool {
        self.dry_run
    }

    /// The longest cooldown of the rules running `action` (runs a person asks for honour it).
    pub fn longest_cooldown(&self, action: ActionKind) -> Option<Duration> {
        self.rules
            .iter()
            .filter(|c| c.rule.action == action)
            .filter_map(|c| c.rule.cooldown.map(Duration::from))
            .max()
    }

    /// The cooldown of the rule named `rule`.
    pub fn cooldown_of(&self, rule: &str) -> Option<Duration> {
        self.rules
            .iter()
            .find(|c| c.rule.name == rule)
            .and_then(|c| c.rule.cooldown.map(Duration::from))
    }

    /// The actions the rules use.
    pub fn actions(&self) -> impl Iterator<Item = ActionKind> + '_ {
        self.rules.iter().map(|c| c.rule.action)
    }

    /// What each matching rule wants for `alert`. An empty list means no rule matches.
    pub fn decide(&self, alert: &Alert) -> Vec<Decision> {
        self.rules
            .iter()
            .filter(|c| matches(c, alert))
            .map(|c| self.decision(&c.rule, alert))
            .collect()
    }

    fn decision(&self, rule: &Rule, alert: &Alert) -> Decision {
        let mut plan = Plan {
            rule: rule.name.clone(),
            action: rule.action,
            target: None,
            dry_run: rule.dry_run.unwrap_or(self.dry_run),
            cooldown: rule.cooldown.map(Into::into),
            origin: Origin::Rule,
        };
        if !self.allowlists.takes_target(rule.action) {
            return Decision::Act(plan);
        }
        let named = rule.target.clone().or_else(|| {
            let label = rule.target_label.as_ref()?;
            alert.labels.get(label).cloned()
        });
        let target = match rule.action {
            // Suspend acts only for alerts about this host.
            ActionKind::Suspend => match alert.host() {
                Some(host) if host == self.allowlists.host => Some(host),
                other => return Decision::Skip(plan, Skip::NotThisHost(other)),
            },
            // Wake defaults to the host the alert is about, and so does a failover or failback
            // where each GPU node has its own pair: the node whose GPU the alert is about.
            ActionKind::Wake | ActionKind::Failover | ActionKind::Failback => {
                named.or_else(|| alert.host())
            }
            _ => named,
        };
        let Some(target) = target else {
            return Decision::Skip(plan, Skip::NoTarget(rule.action));
        };
        // A node as the alert spells it, as the config does.
        let target = self.allowlists.as_configured(rule.action, target);
        if !self.allowlists.allows(rule.action, &target) {
            return Decision::Skip(plan, Skip::NotAllowlisted(rule.action, target));
        }
        plan.target = Some(target);
        Decision::Act(plan)
    }
}

fn matches(compiled: &Compiled, alert: &Alert) -> bool {
    let on = matches!(
        (compiled.rule.on, alert.status),
        (Trigger::Both, _)
            | (Trigger::Firing, AlertStatus::Firing)
            | (Trigger::Resolved, AlertStatus::Resolved)
    );
    on && compiled.matcher.matches(alert)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use aistack_common::config::parse;

    use super::*;

    fn rules(yaml: &str) -> RuleSet {
        let config: Config = parse(yaml).unwrap_or_else(|p| panic!("{p:?}"));
        RuleSet::new(&config).unwrap()
    }

    fn alert(status: AlertStatus, labels: &[(&str, &str)]) -> Alert {
        Alert {
            status,
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            annotations: BTreeMap::new(),
            starts_at: "2026-11-22T21:00:00Z".into(),
            ends_at: String::new(),
            generator_url: String::new(),
            fingerprint: "f".into(),
        }
    }

    const CONFIG: &str = r#"
host: gpu-box
rules:
  - {name: suspend, match: {alertname: AistackHostIdle}, action: suspend, cooldown: 30m}
  - {name: repair, match: {alertname: AistackContainerUnhealthy}, action: repair, target_label: container}
  - {name: phone, match_re: {severity: "critical|warning"}, on: both, action: notify}
  - {name: failback, match: {alertname: AistackGpuHostWorkload}, on: resolved, action: failback}
  - {name: wake, match: {alertname: AistackWakeRequested}, action: wake, dry_run: true}
actions:
  wake: {targets: {gpu-box: {mac: "aa:bb:cc:dd:ee:ff"}, nas: {mac: "aa:bb:cc:dd:ee:00"}}}
  repair: {docker: {containers: [ollama]}}
  failover: {docker: {primary: vllm, fallback: ollama}}
  notify: {ntfy: {topic: aistack}}
"#;

    #[test]
    fn suspend_only_for_this_host() {
        let r = rules(CONFIG);
        let here = alert(
            AlertStatus::Firing,
            &[
                ("alertname", "AistackHostIdle"),
                ("instance", "gpu-box:9470"),
            ],
        );
        let [Decision::Act(plan)] = &r.decide(&here)[..] else {
            panic!("{:?}", r.decide(&here))
        };
        assert_eq!(
            (plan.action, plan.target.as_deref(), plan.cooldown),
            (
                ActionKind::Suspend,
                Some("gpu-box"),
                Some(Duration::from_secs(1800))
            )
        );
        let there = alert(
            AlertStatus::Firing,
            &[("alertname", "AistackHostIdle"), ("host", "other-box")],
        );
        assert_eq!(
            r.decide(&there)[0],
            Decision::Skip(plan.clone(), Skip::NotThisHost(Some("other-box".into())))
                .with_target(None)
        );
    }

    #[test]
    fn labels_select_targets_only_from_the_allowlist() {
        let r = rules(CONFIG);
        let ok = alert(
            AlertStatus::Firing,
            &[
                ("alertname", "AistackContainerUnhealthy"),
                ("container", "ollama"),
            ],
        );
        assert!(
            matches!(&r.decide(&ok)[..], [Decision::Act(p)] if p.target.as_deref() == Some("ollama"))
        );
        let evil = alert(
            AlertStatus::Firing,
            &[
                ("alertname", "AistackContainerUnhealthy"),
                ("container", "postgres"),
            ],
        );
        assert!(
            matches!(&r.decide(&evil)[..], [Decision::Skip(_, Skip::NotAllowlisted(_, t))] if t == "postgres")
        );
        let none = alert(
            AlertStatus::Firing,
            &[("alertname", "AistackContainerUnhealthy")],
        );
        assert!(matches!(
            &r.decide(&none)[..],
            [Decision::Skip(_, Skip::NoTarget(_))]
        ));
    }

    #[test]
    fn status_and_regexes_and_several_rules() {
        let r = rules(CONFIG);
        let critical = alert(
            AlertStatus::Resolved,
            &[
                ("alertname", "AistackGpuHostWorkload"),
                ("severity", "warning"),
            ],
        );
        let actions: Vec<ActionKind> = r
            .decide(&critical)
            .into_iter()
            .map(|d| match d {
                Decision::Act(p) | Decision::Skip(p, _) => p.action,
            })
            .collect();
        assert_eq!(actions, [ActionKind::Notify, ActionKind::Failback]);
        // Anchored: "critical-ish" does not match "critical|warning".
        let sloppy = alert(
            AlertStatus::Firing,
            &[("alertname", "X"), ("severity", "critical-ish")],
        );
        assert!(r.decide(&sloppy).is_empty());
        // A missing label matches as "": failback needs alertname, firing does not match `on: resolved`.
        let firing = alert(
            AlertStatus::Firing,
            &[("alertname", "AistackGpuHostWorkload")],
        );
        assert!(r.decide(&firing).is_empty());
    }

    #[test]
    fn with_a_pair_per_node_the_alerts_node_is_the_failovers_target() {
        let r = rules(
            r#"
exporter_url: "http://{node}:9470"
rules:
  - {name: failover, match: {alertname: AistackGpuHostWorkload}, action: failover}
actions:
  failover:
    platform: kubernetes
    nodes:
      gpu-a:
        kubernetes: {namespace: ml, primary: vllm-a, fallback: ollama-a, service: inference-a}
        primary_health_url: "http://vllm-a.ml.svc:8000/health"
        fallback_health_url: "http://ollama-a.ml.svc:11434/api/tags"
      gpu-b:
        kubernetes: {namespace: ml, primary: vllm-b, fallback: ollama-b, service: inference-b}
        primary_health_url: "http://vllm-b.ml.svc:8000/health"
        fallback_health_url: "http://ollama-b.ml.svc:11434/api/tags"
"#,
        );
        let on = |instance: &str| {
            r.decide(&alert(
                AlertStatus::Firing,
                &[
                    ("alertname", "AistackGpuHostWorkload"),
                    ("instance", instance),
                ],
            ))
        };
        assert!(
            matches!(&on("gpu-b:9470")[..], [Decision::Act(p)] if p.target.as_deref() == Some("gpu-b"))
        );
        assert!(
            matches!(&on("gpu-c:9470")[..], [Decision::Skip(_, Skip::NotAllowlisted(_, t))] if t == "gpu-c"),
            "a node without a pair is not acted on"
        );
        // The same node spelt otherwise: a trailing dot, capitals.
        assert!(
            matches!(&on("GPU-B.:9470")[..], [Decision::Act(p)] if p.target.as_deref() == Some("gpu-b"))
        );
        // A cluster-scoped alert names no node: no pair to move.
        let cluster = r.decide(&alert(
            AlertStatus::Firing,
            &[("alertname", "AistackGpuHostWorkload")],
        ));
        assert!(matches!(
            &cluster[..],
            [Decision::Skip(_, Skip::NoTarget(_))]
        ));
    }

    #[test]
    fn wake_defaults_to_the_alerts_host_and_dry_run_is_carried() {
        let r = rules(CONFIG);
        let a = alert(
            AlertStatus::Firing,
            &[("alertname", "AistackWakeRequested"), ("host", "nas")],
        );
        let [Decision::Act(plan)] = &r.decide(&a)[..] else {
            panic!()
        };
        assert_eq!((plan.target.as_deref(), plan.dry_run), (Some("nas"), true));
    }

    impl Decision {
        fn with_target(self, target: Option<String>) -> Self {
            match self {
                Decision::Skip(mut p, r) => {
                    p.target = target;
                    Decision::Skip(p, r)
                }
                d => d,
            }
        }
    }
}
