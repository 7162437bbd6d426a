//! Rules, compiled: which alerts trigger which action on which target.
//!
//! A rule matches an alert by its own labels (`match`: equality; `match_re`: anchored regexes,
//! a missing label matching as ""), and by its status (`on`). The target comes from the rule
//! (`target`) or a label (`target_label`) and must be in the action's allowlist; suspend acts
//! only for alerts about this host.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use regex::Regex;

use crate::alert::{Alert, AlertStatus};
use crate::config::{ActionKind, Config, Rule, Trigger, anchored_regex};

/// Why a matching rule does not act.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// Suspend, for an alert about another host (or none).
    NotThisHost(Option<String>),
    /// The target is not in the action's allowlist.
    NotAllowlisted(String),
    /// The action needs a target and the rule gives none.
    NoTarget,
    /// This firing already ran (or is running) this rule.
    Duplicate,
    /// The rule ran on this target too recently.
    Cooldown(Duration),
    /// The actioner is paused.
    Paused,
    /// The queue is full (the webhook is answered 503 and retried).
    Overloaded,
    /// Repairs of this target reached `max_attempts` within `window`.
    Exhausted(u32, Duration),
    /// A dry run: planned and journaled, not acted on.
    DryRun,
    /// The condition was re-checked at action time and no longer holds.
    ConditionGone(String),
}

/// The journal's word for a skip because the actioner is paused.
pub const PAUSED: &str = "paused";
/// How a skip for exhausted repairs begins in the journal.
pub const EXHAUSTED_PREFIX: &str = "repairs exhausted:";
/// How a skip after a failed re-check at action time begins in the journal.
pub const CONDITION_GONE_PREFIX: &str = "condition no longer true:";

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotThisHost(Some(host)) => write!(f, "not this host: the alert is about {host}"),
            Self::NotThisHost(None) => write!(f, "not this host: the alert names no host"),
            Self::NotAllowlisted(target) => write!(f, "not allowlisted: {target:?}"),
            Self::NoTarget => write!(
                f,
                "no target: the rule sets neither target nor target_label"
            ),
            Self::Duplicate => write!(f, "duplicate: this firing already ran this rule"),
            Self::Cooldown(left) => write!(f, "cooldown: {}s left", left.as_secs()),
            Self::Paused => f.write_str(PAUSED),
            Self::Overloaded => write!(f, "overloaded: action queue full"),
            Self::Exhausted(n, window) => {
                write!(
                    f,
                    "{EXHAUSTED_PREFIX} {n} in the last {}s; a person is needed",
                    window.as_secs()
                )
            }
            Self::DryRun => write!(f, "dry-run"),
            Self::ConditionGone(why) => write!(f, "{CONDITION_GONE_PREFIX} {why}"),
        }
    }
}

/// What a matching rule wants done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The rule's name.
    pub rule: String,
    /// The action.
    pub action: ActionKind,
    /// The allowlisted target, for actions that take one.
    pub target: Option<String>,
    /// Dry run (the rule's or the global setting).
    pub dry_run: bool,
    /// The rule's cooldown.
    pub cooldown: Option<Duration>,
}

/// The outcome of one rule for one alert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Act (subject to dedupe, cooldown and pause).
    Act(Plan),
    /// Matched, but will not act.
    Skip(Plan, SkipReason),
}

#[derive(Debug)]
struct Compiled {
    rule: Rule,
    matcher: LabelMatcher,
}

/// `match` and `match_re` of a rule or a button offer, compiled: an alert matches when each
/// `match` label has that value and each `match_re` label matches its anchored regex (a
/// missing label is the empty string, as in Alertmanager).
#[derive(Debug)]
pub struct LabelMatcher {
    equal: Vec<(String, String)>,
    regex: Vec<(String, Regex)>,
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
                .map(|(label, pattern)| Ok((label.clone(), anchored_regex(pattern)?)))
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

/// The compiled rules and the allowlists they pick targets from.
#[derive(Debug)]
pub struct RuleSet {
    rules: Vec<Compiled>,
    host: String,
    dry_run: bool,
    buttons: bool,
    wake_targets: BTreeSet<String>,
    repair_targets: BTreeSet<String>,
    repair_limit: (u32, Duration),
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
        let repair = &config.actions.repair;
        Ok(Self {
            rules,
            host: config.host_name(),
            dry_run: config.dry_run,
            buttons: config.actions.notify.buttons.is_some(),
            wake_targets: config.actions.wake.targets.keys().cloned().collect(),
            repair_targets: repair
                .docker
                .containers
                .iter()
                .chain(&repair.kubernetes.deployments)
                .cloned()
                .collect(),
            repair_limit: (repair.max_attempts, repair.window.into()),
        })
    }

    /// The global `dry_run`.
    pub fn dry_run(&self) -> bool {
        self.dry_run
    }

    /// Whether notifications carry buttons (`actions.notify.buttons`).
    pub fn offers_buttons(&self) -> bool {
        self.buttons
    }

    /// This actioner's host name.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Whether `target` may be acted on by `action` (manual triggers check this too).
    pub fn allowlisted(&self, action: ActionKind, target: &str) -> bool {
        match action {
            ActionKind::Wake => self.wake_targets.contains(target),
            ActionKind::Repair => self.repair_targets.contains(target),
            ActionKind::Suspend => target == self.host,
            ActionKind::Failover | ActionKind::Failback | ActionKind::Notify => true,
        }
    }

    /// Repairs allowed per target per window.
    pub fn repair_limit(&self) -> (u32, Duration) {
        self.repair_limit
    }

    /// The longest cooldown of the rules running `action` (manual triggers honour it).
    pub fn cooldown_for(&self, action: ActionKind) -> Option<Duration> {
        self.rules
            .iter()
            .filter(|c| c.rule.action == action)
            .filter_map(|c| c.rule.cooldown.map(Duration::from))
            .max()
    }

    /// Each rule with a cooldown, and the cooldown.
    pub fn cooldowns(&self) -> impl Iterator<Item = (&str, Duration)> {
        self.rules
            .iter()
            .filter_map(|c| Some((c.rule.name.as_str(), Duration::from(c.rule.cooldown?))))
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
        let label_target = rule
            .target_label
            .as_ref()
            .and_then(|l| alert.labels.get(l))
            .cloned();
        let named = rule.target.clone().or(label_target);
        let mut plan = Plan {
            rule: rule.name.clone(),
            action: rule.action,
            target: None,
            dry_run: rule.dry_run.unwrap_or(self.dry_run),
            cooldown: rule.cooldown.map(Into::into),
        };
        let target = match rule.action {
            ActionKind::Failover | ActionKind::Failback | ActionKind::Notify => {
                return Decision::Act(plan);
            }
            // Suspend acts only for alerts about this host.
            ActionKind::Suspend => match alert.host() {
                Some(host) if host == self.host => host,
                other => return Decision::Skip(plan, SkipReason::NotThisHost(other)),
            },
            // Wake defaults to the host the alert is about.
            ActionKind::Wake => match named.or_else(|| alert.host()) {
                Some(target) => target,
                None => return Decision::Skip(plan, SkipReason::NoTarget),
            },
            ActionKind::Repair => match named {
                Some(target) => target,
                None => return Decision::Skip(plan, SkipReason::NoTarget),
            },
        };
        if !self.allowlisted(rule.action, &target) {
            return Decision::Skip(plan, SkipReason::NotAllowlisted(target));
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
            Decision::Skip(
                plan.clone(),
                SkipReason::NotThisHost(Some("other-box".into()))
            )
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
            matches!(&r.decide(&evil)[..], [Decision::Skip(_, SkipReason::NotAllowlisted(t))] if t == "postgres")
        );
        let none = alert(
            AlertStatus::Firing,
            &[("alertname", "AistackContainerUnhealthy")],
        );
        assert!(matches!(
            &r.decide(&none)[..],
            [Decision::Skip(_, SkipReason::NoTarget)]
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
