//! The policy: whether a run may go, decided against the ledger — the one place for each
//! rule of safety. Once-only (a firing runs a rule once, a button is pressed once, not after
//! its alert resolved), pause, cooldowns (a rule's own; a person's run honours the longest of
//! its action's rules), the repair budget, and which targets a person may name. Webhooks,
//! buttons, manual triggers and the wake relay all pass here; only the steps that apply to
//! who asks differ, and they are written down in [`Policy::check`].
//!
//! Decisions of a batch are made before its journal entries are on disk; [`Tentative`]
//! carries what the batch planned so far, so two runs in one batch see each other.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use crate::alert::Alert;
use crate::ledger::{Ledger, Snapshot};
use crate::rules::{Decision, RuleSet};
use crate::vocab::{ActionKind, Backend, Origin, Plan, RunKey, Skip};

/// Repairs allowed per target within a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepairBudget {
    /// `actions.repair.max_attempts`.
    pub max_attempts: u32,
    /// `actions.repair.window`.
    pub window: Duration,
}

/// What the batch being decided planned, not yet on disk.
#[derive(Debug, Default)]
pub struct Tentative {
    keys: HashSet<RunKey>,
    rule_runs: HashSet<(String, String)>,
    action_runs: HashMap<(ActionKind, String), u32>,
    resolved: HashSet<String>,
    /// A pause or resume decided earlier in the batch.
    paused: Option<bool>,
    /// The pairs ("" for the one pair) whose backend a run of the batch moves.
    moves_backend: HashSet<String>,
}

impl Tentative {
    /// `plan` was planned as `key`.
    pub fn planned(&mut self, key: &RunKey, plan: &Plan) {
        self.keys.insert(key.clone());
        if plan.action.moves_backend() && !plan.dry_run {
            self.moves_backend
                .insert(plan.target.clone().unwrap_or_default());
        }
        if plan.dry_run || (plan.action.takes_target() && plan.target.is_none()) {
            return;
        }
        let target = plan.target.clone().unwrap_or_default();
        self.rule_runs.insert((plan.rule.clone(), target.clone()));
        *self.action_runs.entry((plan.action, target)).or_default() += 1;
    }

    /// A pause (or resume) was decided.
    pub fn set_paused(&mut self, paused: bool) {
        self.paused = Some(paused);
    }

    /// Whether automatic actions are paused, counting what the batch decided.
    pub fn paused(&self, ledger: &Ledger) -> bool {
        self.paused.unwrap_or_else(|| ledger.paused())
    }

    /// Whether a failover or failback of `pair` is planned or running (in the batch, or
    /// before it).
    pub fn backend_moving(&self, ledger: &Ledger, pair: &str) -> bool {
        self.moves_backend.contains(pair) || ledger.backend_moving(pair)
    }

    /// Whether the batch planned `key` already.
    pub fn planned_key(&self, key: &RunKey) -> bool {
        self.keys.contains(key)
    }

    /// The firing `<fingerprint>@<startsAt>` resolved.
    pub fn resolved(&mut self, firing: String) {
        self.resolved.insert(firing);
    }
}

/// A run a person asks for: the API, the wake relay, a button.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The action.
    pub action: ActionKind,
    /// Its allowlisted target, for actions that take one; the relay sends a raw MAC with
    /// none, and its own checks (destinations, rate) apply instead.
    pub target: Option<String>,
    /// Plan and journal only.
    pub dry_run: bool,
    /// Who asks.
    pub origin: Origin,
    /// A button: once-only, and about an alert firing.
    pub once: Option<Once>,
}

/// A run that may happen at most once: its key, and the alert firing it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Once {
    /// The journal key; a second request with it is refused.
    pub key: RunKey,
    /// `<fingerprint>@<startsAt>`: refused once that firing has resolved.
    pub firing: String,
}

/// The rules and budgets decisions are made by.
#[derive(Debug)]
pub struct Policy {
    rules: RuleSet,
    repair: RepairBudget,
}

/// What the policy says about one candidate run.
pub type Verdict = Result<(), Skip>;

impl Policy {
    /// Decides by `rules` and the repair budget.
    pub fn new(rules: RuleSet, repair: RepairBudget) -> Self {
        Self { rules, repair }
    }

    /// The rules.
    pub fn rules(&self) -> &RuleSet {
        &self.rules
    }

    /// For each rule matching `alert`: the run's key and plan, and whether it may go.
    pub fn for_alert(
        &self,
        ledger: &Ledger,
        batch: &Tentative,
        alert: &Alert,
        now: SystemTime,
    ) -> Vec<(RunKey, Plan, Verdict)> {
        self.rules
            .decide(alert)
            .into_iter()
            .map(|decision| {
                let (plan, skip) = match decision {
                    Decision::Act(plan) => (plan, None),
                    Decision::Skip(plan, skip) => (plan, Some(skip)),
                };
                let key = RunKey::firing(&plan.rule, alert);
                let verdict = match skip {
                    Some(skip) => Err(skip),
                    None => self.check(ledger, batch, &key, &plan, None, now),
                };
                (key, plan, verdict)
            })
            .collect()
    }

    /// The plan for a person's `request`, and whether it may go.
    pub fn for_request(
        &self,
        ledger: &Ledger,
        batch: &Tentative,
        request: &Request,
        key: &RunKey,
        now: SystemTime,
    ) -> (Plan, Verdict) {
        let plan = Plan {
            rule: request.origin.manual_rule().to_owned(),
            action: request.action,
            target: request
                .target
                .clone()
                .filter(|_| self.rules.allowlists().takes_target(request.action))
                .map(|target| {
                    self.rules
                        .allowlists()
                        .as_configured(request.action, target)
                }),
            // The global dry_run holds for people too: nothing acts while it is set.
            dry_run: request.dry_run || self.rules.dry_run(),
            cooldown: None,
            origin: request.origin,
        };
        let verdict = self.check(ledger, batch, key, &plan, Some(request), now);
        (plan, verdict)
    }

    /// Every check, in order; the first that fails says why.
    ///
    /// | check | rules | API, buttons | relay |
    /// |---|---|---|---|
    /// | once-only key | duplicate | buttons: already done, resolved | — |
    /// | target named and allowlisted | (done by the rule) | yes | named targets only |
    /// | paused | yes, dry runs too | yes (dry runs pass) | no: a person asking for a host |
    /// | cooldown | the rule's, per rule and target | the action's longest, per target | the same |
    /// | repair budget | yes | no: a person is the one it waits for | — |
    fn check(
        &self,
        ledger: &Ledger,
        batch: &Tentative,
        key: &RunKey,
        plan: &Plan,
        request: Option<&Request>,
        now: SystemTime,
    ) -> Verdict {
        let ran = |key: &RunKey| ledger.ran(key) || batch.keys.contains(key);
        match request {
            None if ran(key) => return Err(Skip::Duplicate),
            Some(Request {
                once: Some(once), ..
            }) => {
                if ran(&once.key) {
                    return Err(Skip::AlreadyDone);
                }
                if ledger.has_resolved(&once.firing) || batch.resolved.contains(&once.firing) {
                    return Err(Skip::Resolved);
                }
            }
            _ => {}
        }
        let raw_wake = |r: &Request| r.origin == Origin::Relay && r.target.is_none();
        let takes_target = self.rules.allowlists().takes_target(plan.action);
        if request.is_some_and(|r| !raw_wake(r) && takes_target) {
            match &plan.target {
                None => return Err(Skip::NoTarget(plan.action)),
                Some(t) if !self.rules.allowlists().allows(plan.action, t) => {
                    return Err(Skip::NotAllowlisted(plan.action, t.clone()));
                }
                Some(_) => {}
            }
        }
        let held_by_pause = match plan.origin {
            Origin::Rule => true,
            Origin::Relay => false,
            Origin::Api | Origin::Button => !plan.dry_run,
        };
        if batch.paused(ledger) && held_by_pause {
            return Err(Skip::Paused);
        }
        if plan.dry_run {
            return Ok(());
        }
        if let Some(left) = self.cooldown_left(ledger, batch, plan, now) {
            return Err(Skip::Cooldown(left));
        }
        if plan.action == ActionKind::Repair && plan.origin == Origin::Rule {
            let target = plan.target.as_deref().unwrap_or_default();
            let attempts = self.repairs_within(ledger, target, now)
                + batch
                    .action_runs
                    .get(&(ActionKind::Repair, target.to_owned()))
                    .copied()
                    .unwrap_or(0);
            if attempts >= self.repair.max_attempts {
                return Err(Skip::Exhausted {
                    attempts,
                    window: self.repair.window,
                });
            }
        }
        Ok(())
    }

    /// Time left before `plan` may run again on its target, if any.
    fn cooldown_left(
        &self,
        ledger: &Ledger,
        batch: &Tentative,
        plan: &Plan,
        now: SystemTime,
    ) -> Option<Duration> {
        if plan.action.takes_target() && plan.target.is_none() {
            return None;
        }
        let target = plan.target.clone().unwrap_or_default();
        let (cooldown, planned_now, last) = if plan.origin == Origin::Rule {
            (
                plan.cooldown?,
                batch
                    .rule_runs
                    .contains(&(plan.rule.clone(), target.clone())),
                ledger.rule_last_run(&plan.rule, &target).map(|t| t.0),
            )
        } else {
            (
                self.rules.longest_cooldown(plan.action)?,
                batch
                    .action_runs
                    .contains_key(&(plan.action, target.clone())),
                ledger.action_runs(plan.action, &target).last(),
            )
        };
        if planned_now {
            return Some(cooldown);
        }
        let since = now.duration_since(last?).unwrap_or(Duration::ZERO);
        cooldown.checked_sub(since).filter(|left| !left.is_zero())
    }

    /// `at + by`, or far in the future when that does not fit.
    fn later(at: SystemTime, by: Duration) -> SystemTime {
        at.checked_add(by).unwrap_or_else(|| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(u64::from(u32::MAX) * 64)
        })
    }

    /// When `target` was repaired within the window, oldest first.
    fn repairs_in_window<'a>(
        &'a self,
        ledger: &'a Ledger,
        target: &'a str,
        now: SystemTime,
    ) -> impl Iterator<Item = SystemTime> + 'a {
        ledger
            .action_runs(ActionKind::Repair, target)
            .filter(move |at| {
                now.duration_since(*at).unwrap_or(Duration::ZERO) < self.repair.window
            })
    }

    fn repairs_within(&self, ledger: &Ledger, target: &str, now: SystemTime) -> u32 {
        u32::try_from(self.repairs_in_window(ledger, target, now).count()).unwrap_or(u32::MAX)
    }

    /// Until when `target`'s repairs stay exhausted: when enough counted repairs leave the
    /// window for one more to be planned. `None` when a repair may be planned now.
    fn exhausted_until(
        &self,
        ledger: &Ledger,
        target: &str,
        now: SystemTime,
    ) -> Option<SystemTime> {
        let in_window: Vec<SystemTime> = self.repairs_in_window(ledger, target, now).collect();
        let max = usize::try_from(self.repair.max_attempts).unwrap_or(usize::MAX);
        let over = in_window.len().checked_sub(max)?;
        // The (over+1)-th oldest run must leave the window.
        in_window
            .get(over)
            .map(|at| Self::later(*at, self.repair.window))
    }

    /// What `/metrics`, `/api/v1/state` and `/api/v1/actions` read: the ledger now.
    pub fn snapshot(
        &self,
        ledger: &Ledger,
        now: SystemTime,
        journal_failure: Option<String>,
    ) -> Snapshot {
        let cooldowns = ledger
            .rule_runs()
            .filter_map(|(rule, target, at)| {
                let until = Self::later(at.0, self.rules.cooldown_of(rule)?);
                (until > now).then(|| (format!("{rule}/{target}"), until))
            })
            .collect();
        let exhausted = ledger
            .exhausted()
            .map(|t| (t.to_owned(), self.exhausted_until(ledger, t, now)))
            .collect();
        let node_backends: Vec<_> = self
            .rules
            .allowlists()
            .failover
            .iter()
            .map(|node| {
                let (backend, since) = ledger.backend(node);
                (node.clone(), backend, since)
            })
            .collect();
        // Where each node has its own pair, the cluster counts as on the fallback while any
        // node is, since the first of them moved; else on the primary since the last came back.
        let (backend, backend_since) = if node_backends.is_empty() {
            ledger.backend("")
        } else {
            let since = |wanted: Backend| {
                node_backends
                    .iter()
                    .filter(move |(_, backend, _)| *backend == wanted)
                    .filter_map(|(_, _, since)| *since)
            };
            match since(Backend::Fallback).min() {
                Some(first) => (Backend::Fallback, Some(first)),
                None if node_backends
                    .iter()
                    .any(|(_, b, _)| *b == Backend::Fallback) =>
                {
                    (Backend::Fallback, None)
                }
                None => (Backend::Primary, since(Backend::Primary).max()),
            }
        };
        Snapshot {
            paused: ledger.paused(),
            backend,
            backend_since,
            node_backends,
            cooldowns,
            exhausted,
            recent: ledger.recent().iter().cloned().collect::<Vec<_>>().into(),
            last_suspend: ledger.last_suspend().cloned(),
            journal_failure,
        }
    }
}

#[cfg(test)]
mod tests;
