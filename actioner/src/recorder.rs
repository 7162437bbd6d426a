//! The recorder: the one task that decides and journals. Webhooks, manual triggers, pause and
//! the executor's progress reports all pass through it, so every decision is made against one
//! consistent ledger (which firings already ran, cooldowns, pause) and is on disk before anyone
//! is answered or anything acts.
//!
//! Commands arriving together are decided together and committed with one fsync (group
//! commit), which is what lets a journal that syncs every decision take thousands of webhooks
//! a second. A full inbox or a full action queue answers "overloaded" (503), so Alertmanager
//! retries later; a journal that cannot be written answers an error (500) and nothing acts.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::actions::{Job, RawWake};
use crate::alert::{Alert, AlertStatus, WebhookPayload};
use crate::config::ActionKind;
use crate::journal::{AlertRef, Event, Journal, JournalEntry};
use crate::metrics::Metrics;
use crate::rules::{
    CONDITION_GONE_PREFIX, Decision, EXHAUSTED_PREFIX, PAUSED, Plan, RuleSet, SkipReason,
};

/// The `source` of wake requests through the relay (`POST /api/v1/wake`).
pub const WAKE_RELAY: &str = "wake-relay";

/// How the run of a job ended, for those who wait on it (manual triggers, the wake relay).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", content = "detail", rename_all = "snake_case")]
pub enum Outcome {
    /// It worked.
    Succeeded(String),
    /// It did not.
    Failed(String),
    /// It was not done (condition gone).
    Skipped(String),
    /// Dry run: what it would have done.
    DryRun(String),
}

/// A job for the executor, with whoever waits for its end.
#[derive(Debug)]
pub struct Queued {
    /// The job.
    pub job: Job,
    /// Told how it ended.
    pub outcome: Option<oneshot::Sender<Outcome>>,
}

/// Why the recorder could not take a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Inbox or action queue full: try again later (503).
    #[error("overloaded: try again later")]
    Overloaded,
    /// The journal could not be written (500).
    #[error("journal unavailable: {0}")]
    Journal(String),
    /// The recorder stopped (shutdown).
    #[error("shutting down")]
    Stopped,
}

/// Why a manual trigger was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManualError {
    /// Automatic and manual actions are paused (409).
    #[error("paused")]
    Paused,
    /// The target ran this action too recently (409).
    #[error("cooldown: {}s left", .0.as_secs())]
    Cooldown(Duration),
    /// The target is not allowlisted, or missing (400).
    #[error("{0}")]
    BadTarget(String),
    /// A once-only request that already ran (409).
    #[error("already done: this button was pressed before")]
    AlreadyDone,
    /// A once-only request about an alert firing that has resolved since (409).
    #[error("resolved: the alert this button was for has resolved")]
    Resolved,
    /// As for webhooks.
    #[error(transparent)]
    Record(#[from] RecordError),
}

/// What a webhook came to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WebhookReceipt {
    /// Alerts received.
    pub received: usize,
    /// Actions planned.
    pub planned: usize,
}

/// `GET /api/v1/state`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StateView {
    /// `primary` or `fallback`.
    pub inference_backend: &'static str,
    /// When it became so (RFC 3339), if ever.
    pub since: Option<String>,
    /// Whether automatic actions are paused.
    pub paused: bool,
    /// Seconds left per `rule/target` in cooldown.
    pub cooldowns: HashMap<String, u64>,
}

/// A manual trigger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManualRequest {
    /// The action.
    pub action: ActionKind,
    /// Its allowlisted target, for actions that take one.
    pub target: Option<String>,
    /// The wake relay's explicit MAC, instead of a named target.
    pub raw_wake: Option<RawWake>,
    /// Plan and journal only.
    pub dry_run: bool,
    /// Who asked (`api`, [`WAKE_RELAY`], `button`), for the journal.
    pub source: &'static str,
    /// A request that runs at most once (a notification button); refused once planned.
    pub once: Option<Once>,
}

/// A once-only request: its journal key, and the alert firing it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Once {
    /// The journal key; a second request with it is refused.
    pub key: String,
    /// `<fingerprint>@<startsAt>`: refused once that firing has resolved.
    pub firing: String,
}

/// How a refusal of a repeat begins in the journal: a re-sent webhook, a button pressed again.
/// Journaled under the key of the run it repeats, and that run goes on.
const REPEAT_PREFIXES: [&str; 2] = ["duplicate:", "already done:"];
/// Distinct once-only refusals remembered, so that presses repeated in a flood are journaled
/// once per start (and counted every time).
const REFUSALS_REMEMBERED: usize = 4096;

enum Command {
    Webhook {
        payload: WebhookPayload,
        reply: oneshot::Sender<Result<WebhookReceipt, RecordError>>,
    },
    Manual {
        request: ManualRequest,
        reply: oneshot::Sender<Result<oneshot::Receiver<Outcome>, ManualError>>,
    },
    Record {
        entries: Vec<JournalEntry>,
        reply: oneshot::Sender<Result<(), RecordError>>,
    },
    Pause {
        paused: bool,
        reply: oneshot::Sender<Result<(), RecordError>>,
    },
    State {
        reply: oneshot::Sender<StateView>,
    },
    Recent {
        limit: usize,
        reply: oneshot::Sender<Vec<JournalEntry>>,
    },
}

/// A handle on the recorder task; cheap to clone.
#[derive(Debug, Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Command>,
}

/// Firings remembered for dedupe; older ones are forgotten first (the journal keeps them).
pub const DEDUPE_CAPACITY: usize = 200_000;
/// Journal entries kept in memory for `GET /api/v1/actions`.
pub const RECENT_CAPACITY: usize = 1000;
/// Commands decided in one batch at most.
const BATCH: usize = 512;

fn key_hash(key: &str) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(key)
}

/// What the journal says, folded.
#[derive(Debug, Default)]
struct Ledger {
    /// Hashes of the keys that ran: 8 bytes a firing, so the dedupe state stays small under a
    /// flood of distinct alerts (a 64-bit collision among 200 000 keys: about 1 in 10⁹).
    done: HashSet<u64>,
    done_order: VecDeque<u64>,
    last_run_rule: HashMap<(String, String), SystemTime>,
    last_run_action: HashMap<(ActionKind, String), SystemTime>,
    /// Recent planned runs per action and target (at most 32 each), for repair limits.
    runs: HashMap<(ActionKind, String), VecDeque<SystemTime>>,
    paused: bool,
    fallback: bool,
    backend_since: Option<String>,
    running: HashMap<String, JournalEntry>,
    /// Planned runs not started yet (queued for the executor).
    pending: HashMap<String, JournalEntry>,
    recent: VecDeque<JournalEntry>,
    /// Repair targets whose last word was "repairs exhausted", to restore the gauge on start.
    exhausted: HashSet<String>,
    /// A rule's failback skipped because paused, and no backend decision since: run at the
    /// resume, as Alertmanager sends a resolution only once.
    deferred_failback: Option<JournalEntry>,
    /// Whether to keep `resolved`: only buttons need it.
    track_resolved: bool,
    /// Hashes of the `<fingerprint>@<startsAt>` of firings that resolved, for buttons.
    resolved: HashSet<u64>,
    resolved_order: VecDeque<u64>,
}

impl Ledger {
    fn ran(&self, key: &str) -> bool {
        self.done.contains(&key_hash(key))
    }

    fn mark_done(&mut self, key: &str) {
        let hash = key_hash(key);
        if self.done.insert(hash) {
            self.done_order.push_back(hash);
            if self.done_order.len() > DEDUPE_CAPACITY
                && let Some(old) = self.done_order.pop_front()
            {
                self.done.remove(&old);
            }
        }
    }

    fn apply(&mut self, entry: &JournalEntry) {
        let key = entry.key.clone().unwrap_or_default();
        let target = entry.target.clone().unwrap_or_default();
        match entry.event {
            Event::Planned => {
                if matches!(
                    entry.action,
                    Some(ActionKind::Failover | ActionKind::Failback)
                ) {
                    self.deferred_failback = None;
                }
                self.mark_done(&key);
                self.pending.insert(key.clone(), entry.clone());
                if !entry.dry_run {
                    let at = humantime::parse_rfc3339_weak(&entry.ts)
                        .unwrap_or_else(|_| SystemTime::now());
                    if let Some(rule) = &entry.rule {
                        self.last_run_rule
                            .insert((rule.clone(), target.clone()), at);
                    }
                    if let Some(action) = entry.action {
                        self.last_run_action.insert((action, target.clone()), at);
                        let runs = self.runs.entry((action, target)).or_default();
                        runs.push_back(at);
                        if runs.len() > 32 {
                            runs.pop_front();
                        }
                    }
                }
            }
            Event::Started => {
                self.pending.remove(&key);
                self.running.insert(key, entry.clone());
            }
            Event::Succeeded | Event::Failed => {
                self.pending.remove(&key);
                self.running.remove(&key);
                if entry.event == Event::Succeeded {
                    if entry.action == Some(ActionKind::Repair) {
                        self.exhausted.remove(&target);
                    }
                    match entry.action {
                        Some(ActionKind::Failover) => {
                            self.fallback = true;
                            self.backend_since = Some(entry.ts.clone());
                        }
                        Some(ActionKind::Failback) => {
                            self.fallback = false;
                            self.backend_since = Some(entry.ts.clone());
                        }
                        _ => {}
                    }
                }
            }
            Event::Skipped => {
                let detail = entry.detail.as_deref().unwrap_or_default();
                // A rule's backend decision missed while paused: the latest one counts (a
                // failover skipped after it means the GPU is busy again).
                if entry.alert.is_some() && detail == PAUSED {
                    match entry.action {
                        Some(ActionKind::Failback) => self.deferred_failback = Some(entry.clone()),
                        Some(ActionKind::Failover) => self.deferred_failback = None,
                        _ => {}
                    }
                }
                if !REPEAT_PREFIXES.iter().any(|p| detail.starts_with(p)) {
                    self.pending.remove(&key);
                    self.running.remove(&key);
                }
                if entry.action == Some(ActionKind::Repair) {
                    let detail = entry.detail.as_deref().unwrap_or_default();
                    if detail.starts_with(EXHAUSTED_PREFIX) {
                        self.exhausted.insert(target);
                    } else if detail.starts_with(CONDITION_GONE_PREFIX) {
                        self.exhausted.remove(&target);
                    }
                }
            }
            Event::Paused => self.paused = true,
            Event::Resumed => self.paused = false,
            Event::Received => {
                if let Some(alert) = entry
                    .alert
                    .as_ref()
                    .filter(|a| self.track_resolved && a.status == AlertStatus::Resolved)
                {
                    let hash = key_hash(&format!("{}@{}", alert.fingerprint, alert.starts_at));
                    if self.resolved.insert(hash) {
                        self.resolved_order.push_back(hash);
                        if self.resolved_order.len() > DEDUPE_CAPACITY
                            && let Some(old) = self.resolved_order.pop_front()
                        {
                            self.resolved.remove(&old);
                        }
                    }
                }
            }
        }
    }

    fn has_resolved(&self, firing: &str) -> bool {
        self.resolved.contains(&key_hash(firing))
    }

    /// Keeps written entries for `GET /api/v1/actions`.
    fn remember(&mut self, entries: &[JournalEntry]) {
        for entry in entries {
            self.recent.push_back(entry.clone());
            if self.recent.len() > RECENT_CAPACITY {
                self.recent.pop_front();
            }
        }
    }

    fn runs_within(
        &self,
        action: ActionKind,
        target: &str,
        window: Duration,
        now: SystemTime,
    ) -> u32 {
        self.runs
            .get(&(action, target.to_owned()))
            .map_or(0, |runs| {
                runs.iter()
                    .filter(|at| now.duration_since(**at).unwrap_or(Duration::ZERO) < window)
                    .count() as u32
            })
    }

    /// How long until the oldest run of `action` on `target` within `window` leaves it.
    fn window_left(
        &self,
        action: ActionKind,
        target: &str,
        window: Duration,
        now: SystemTime,
    ) -> Duration {
        self.runs
            .get(&(action, target.to_owned()))
            .and_then(|runs| {
                runs.iter()
                    .map(|at| now.duration_since(*at).unwrap_or(Duration::ZERO))
                    .filter(|age| *age < window)
                    .max()
            })
            .map_or(Duration::ZERO, |age| window - age)
    }

    fn cooldown_left(
        &self,
        rule: &str,
        target: &str,
        cooldown: Option<Duration>,
        now: SystemTime,
    ) -> Option<Duration> {
        let cooldown = cooldown?;
        let last = self
            .last_run_rule
            .get(&(rule.to_owned(), target.to_owned()))?;
        let since = now.duration_since(*last).unwrap_or(Duration::ZERO);
        cooldown.checked_sub(since).filter(|left| !left.is_zero())
    }
}

fn entry(event: Event, key: &str, plan: &Plan, alert: Option<&Alert>) -> JournalEntry {
    JournalEntry {
        key: Some(key.to_owned()),
        rule: Some(plan.rule.clone()),
        action: Some(plan.action),
        target: plan.target.clone(),
        alert: alert.map(AlertRef::from),
        dry_run: plan.dry_run,
        ..JournalEntry::new(event)
    }
}

/// What the recorder owns.
struct Task {
    journal: Journal,
    ledger: Ledger,
    rules: RuleSet,
    jobs: mpsc::Sender<Queued>,
    metrics: Metrics,
    manual_seq: u64,
    /// Hashes of once-only refusals journaled since the start (key and why).
    refusals: HashSet<u64>,
}

/// An answer deferred until the batch's journal write is known.
type Reply = Box<dyn FnOnce(Result<(), RecordError>) + Send>;

/// Effects of a batch, released only after the journal write succeeded.
#[derive(Default)]
struct Batch {
    entries: Vec<JournalEntry>,
    jobs: Vec<(mpsc::OwnedPermit<Queued>, Queued)>,
    replies: Vec<Reply>,
    new_keys: HashSet<String>,
    /// `<fingerprint>@<startsAt>` of firings resolved in this batch.
    resolved: HashSet<String>,
    /// (rule, target) and (action, target) planned in this batch, for cooldowns within it.
    new_rule_runs: HashSet<(String, String)>,
    new_action_runs: HashSet<(ActionKind, String)>,
}

impl Task {
    fn webhook(
        &mut self,
        payload: WebhookPayload,
        batch: &mut Batch,
    ) -> Result<WebhookReceipt, RecordError> {
        if payload.truncated_alerts > 0 {
            tracing::warn!(truncated = payload.truncated_alerts, receiver = %payload.receiver, "Alertmanager left alerts out of this webhook (max_alerts)");
        }
        let now = SystemTime::now();
        let mut receipt = WebhookReceipt {
            received: payload.alerts.len(),
            planned: 0,
        };
        let mut overloaded = false;
        for alert in &payload.alerts {
            if self.ledger.track_resolved && alert.status == AlertStatus::Resolved {
                batch
                    .resolved
                    .insert(format!("{}@{}", alert.fingerprint, alert.starts_at));
            }
            let decisions = self.rules.decide(alert);
            batch.entries.push(JournalEntry {
                alert: Some(AlertRef::from(alert)),
                detail: Some(format!("{} rule(s) match", decisions.len())),
                ..JournalEntry::new(Event::Received)
            });
            for decision in decisions {
                let (plan, skip) = match decision {
                    Decision::Act(plan) => (plan, None),
                    Decision::Skip(plan, reason) => (plan, Some(reason)),
                };
                let key = format!(
                    "{}|{}|{}|{}",
                    plan.rule,
                    alert.fingerprint,
                    alert.starts_at,
                    alert.status.as_str()
                );
                let target = plan.target.clone().unwrap_or_default();
                let skip = skip.or_else(|| {
                    if self.ledger.ran(&key) || batch.new_keys.contains(&key) {
                        Some(SkipReason::Duplicate)
                    } else if self.ledger.paused {
                        Some(SkipReason::Paused)
                    } else if let (Some(cooldown), true) = (
                        plan.cooldown,
                        batch
                            .new_rule_runs
                            .contains(&(plan.rule.clone(), target.clone())),
                    ) {
                        Some(SkipReason::Cooldown(cooldown))
                    } else if let Some(left) =
                        self.ledger
                            .cooldown_left(&plan.rule, &target, plan.cooldown, now)
                    {
                        Some(SkipReason::Cooldown(left))
                    } else if plan.action == ActionKind::Repair && !plan.dry_run {
                        let (max, window) = self.rules.repair_limit();
                        let planned_now = u32::from(
                            batch
                                .new_action_runs
                                .contains(&(ActionKind::Repair, target.clone())),
                        );
                        let n = self
                            .ledger
                            .runs_within(ActionKind::Repair, &target, window, now)
                            + planned_now;
                        (n >= max).then_some(SkipReason::Exhausted(n, window))
                    } else {
                        None
                    }
                });
                if let Some(reason) = skip {
                    if matches!(reason, SkipReason::Exhausted(..)) {
                        tracing::warn!(target = %target, rule = %plan.rule, "repairs exhausted; leaving it to a person");
                        let (_, window) = self.rules.repair_limit();
                        let left =
                            self.ledger
                                .window_left(ActionKind::Repair, &target, window, now);
                        self.metrics.set_repair_exhausted_for(&target, left);
                    }
                    self.metrics.count(plan.action.name(), "skipped");
                    batch.entries.push(JournalEntry {
                        detail: Some(reason.to_string()),
                        ..entry(Event::Skipped, &key, &plan, Some(alert))
                    });
                    continue;
                }
                let Ok(permit) = self.jobs.clone().try_reserve_owned() else {
                    overloaded = true;
                    batch.entries.push(JournalEntry {
                        detail: Some(SkipReason::Overloaded.to_string()),
                        ..entry(Event::Skipped, &key, &plan, Some(alert))
                    });
                    continue;
                };
                let planned = entry(Event::Planned, &key, &plan, Some(alert));
                batch.new_keys.insert(key.clone());
                if !plan.dry_run {
                    batch
                        .new_rule_runs
                        .insert((plan.rule.clone(), target.clone()));
                    batch.new_action_runs.insert((plan.action, target));
                }
                batch.entries.push(planned);
                let job = Job {
                    key,
                    plan,
                    alert: Some(alert.clone()),
                    external_url: payload.external_url.clone(),
                    raw_wake: None,
                };
                batch.jobs.push((permit, Queued { job, outcome: None }));
                receipt.planned += 1;
            }
        }
        if overloaded {
            Err(RecordError::Overloaded)
        } else {
            Ok(receipt)
        }
    }

    /// At a resume: the failback a rule wanted while paused, if the backend is still the
    /// fallback. It runs with its usual re-check (vLLM must come up healthy).
    fn plan_deferred_failback(&mut self, batch: &mut Batch) {
        let Some(skipped) = self.ledger.deferred_failback.take() else {
            return;
        };
        let key = skipped.key.clone().unwrap_or_default();
        if !self.ledger.fallback || self.ledger.ran(&key) || batch.new_keys.contains(&key) {
            return;
        }
        let plan = Plan {
            rule: skipped.rule.clone().unwrap_or_default(),
            action: ActionKind::Failback,
            target: None,
            dry_run: skipped.dry_run,
            cooldown: None,
        };
        // Now, not when it was skipped: the time counts for cooldowns.
        let now = |event, detail: String| JournalEntry {
            key: skipped.key.clone(),
            rule: skipped.rule.clone(),
            action: skipped.action,
            alert: skipped.alert.clone(),
            dry_run: skipped.dry_run,
            detail: Some(detail),
            ..JournalEntry::new(event)
        };
        let Ok(permit) = self.jobs.clone().try_reserve_owned() else {
            batch
                .entries
                .push(now(Event::Skipped, SkipReason::Overloaded.to_string()));
            return;
        };
        batch.entries.push(now(
            Event::Planned,
            "deferred: the alert resolved while paused".into(),
        ));
        batch.new_keys.insert(key.clone());
        let job = Job {
            key,
            plan,
            alert: None,
            external_url: String::new(),
            raw_wake: None,
        };
        batch.jobs.push((permit, Queued { job, outcome: None }));
    }

    fn manual(
        &mut self,
        request: ManualRequest,
        batch: &mut Batch,
    ) -> Result<oneshot::Receiver<Outcome>, ManualError> {
        self.manual_seq += 1;
        let key = request.once.as_ref().map_or_else(
            || {
                format!(
                    "manual:{}:{}",
                    humantime::format_rfc3339_millis(SystemTime::now()),
                    self.manual_seq
                )
            },
            |once| once.key.clone(),
        );
        // The global dry_run holds for manual triggers too: nothing acts while it is set.
        let dry_run = request.dry_run || self.rules.dry_run();
        let target = match (&request.raw_wake, &request.target) {
            (Some(raw), _) => Some(format!("mac:{}", raw.mac)),
            (None, Some(t)) => Some(t.clone()),
            (None, None) => None,
        };
        let plan = Plan {
            rule: format!("manual:{}", request.source),
            action: request.action,
            target: target.clone(),
            dry_run,
            cooldown: None,
        };
        let once = request.once.is_some();
        let refuse = |this: &mut Self, batch: &mut Batch, err: ManualError| {
            this.metrics.count(plan.action.name(), "skipped");
            let detail = err.to_string();
            // Anyone who saw a button can press it again and again: journal each distinct
            // refusal of it once per start, not once per press.
            let first = !once || {
                let refusal = key_hash(&format!("{key}\n{detail}"));
                if this.refusals.len() >= REFUSALS_REMEMBERED {
                    this.refusals.clear();
                }
                this.refusals.insert(refusal)
            };
            if first {
                batch.entries.push(JournalEntry {
                    detail: Some(detail),
                    ..entry(Event::Skipped, &key, &plan, None)
                });
            }
            Err(err)
        };
        if let Some(once) = &request.once {
            if self.ledger.ran(&key) || batch.new_keys.contains(&key) {
                return refuse(self, batch, ManualError::AlreadyDone);
            }
            if self.ledger.has_resolved(&once.firing) || batch.resolved.contains(&once.firing) {
                return refuse(self, batch, ManualError::Resolved);
            }
        }
        let takes_target = matches!(
            request.action,
            ActionKind::Wake | ActionKind::Repair | ActionKind::Suspend
        );
        if request.raw_wake.is_none() && takes_target {
            match &request.target {
                None => {
                    return refuse(
                        self,
                        batch,
                        ManualError::BadTarget(format!(
                            "the {} action needs a target",
                            request.action
                        )),
                    );
                }
                Some(t) if !self.rules.allowlisted(request.action, t) => {
                    return refuse(
                        self,
                        batch,
                        ManualError::BadTarget(format!(
                            "{t:?} is not in the {} allowlist",
                            request.action
                        )),
                    );
                }
                Some(_) => {}
            }
        }
        // Pause stops what aistack does by itself and by API; the wake relay is a person
        // asking for a host, and goes through.
        if self.ledger.paused && !dry_run && request.source != WAKE_RELAY {
            return refuse(self, batch, ManualError::Paused);
        }
        let target_key = target.clone().unwrap_or_default();
        let cooldown = self.rules.cooldown_for(request.action).and_then(|c| {
            let last = self
                .ledger
                .last_run_action
                .get(&(request.action, target_key.clone()))?;
            let since = SystemTime::now()
                .duration_since(*last)
                .unwrap_or(Duration::ZERO);
            c.checked_sub(since).filter(|l| !l.is_zero())
        });
        let cooldown = cooldown.or_else(|| {
            let planned_now = batch
                .new_action_runs
                .contains(&(request.action, target_key.clone()));
            self.rules
                .cooldown_for(request.action)
                .filter(|_| planned_now)
        });
        if let (Some(left), false) = (cooldown, dry_run) {
            return refuse(self, batch, ManualError::Cooldown(left));
        }
        let Ok(permit) = self.jobs.clone().try_reserve_owned() else {
            return Err(ManualError::Record(RecordError::Overloaded));
        };
        let planned = entry(Event::Planned, &key, &plan, None);
        batch.new_keys.insert(key.clone());
        if !dry_run {
            batch
                .new_action_runs
                .insert((request.action, target.clone().unwrap_or_default()));
        }
        batch.entries.push(planned);
        let (tx, rx) = oneshot::channel();
        let job = Job {
            key,
            plan,
            alert: None,
            external_url: String::new(),
            raw_wake: request.raw_wake,
        };
        batch.jobs.push((
            permit,
            Queued {
                job,
                outcome: Some(tx),
            },
        ));
        Ok(rx)
    }

    fn state(&self) -> StateView {
        let now = SystemTime::now();
        let cooldowns = self
            .rules
            .cooldowns()
            .flat_map(|(rule, cooldown)| {
                let runs = self
                    .ledger
                    .last_run_rule
                    .iter()
                    .filter(move |((r, _), _)| r == rule);
                runs.filter_map(move |((r, target), last)| {
                    let since = now.duration_since(*last).unwrap_or(Duration::ZERO);
                    let left = cooldown.checked_sub(since).filter(|l| !l.is_zero())?;
                    Some((format!("{r}/{target}"), left.as_secs().max(1)))
                })
            })
            .collect();
        StateView {
            inference_backend: if self.ledger.fallback {
                "fallback"
            } else {
                "primary"
            },
            since: self.ledger.backend_since.clone(),
            paused: self.ledger.paused,
            cooldowns,
        }
    }

    /// Decides a batch of commands, commits its journal entries with one fsync, then releases
    /// its jobs and answers.
    fn run_batch(&mut self, commands: Vec<Command>) {
        let mut batch = Batch::default();
        for command in commands {
            match command {
                Command::Webhook { payload, reply } => {
                    let result = self.webhook(payload, &mut batch);
                    batch.replies.push(Box::new(move |commit| {
                        let _ = reply.send(commit.and(result));
                    }));
                }
                Command::Manual { request, reply } => {
                    let result = self.manual(request, &mut batch);
                    batch.replies.push(Box::new(move |commit| {
                        let _ = reply.send(commit.map_err(ManualError::Record).and(result));
                    }));
                }
                Command::Record { entries, reply } => {
                    batch.entries.extend(entries);
                    batch.replies.push(Box::new(move |commit| {
                        let _ = reply.send(commit);
                    }));
                }
                Command::Pause { paused, reply } => {
                    if self.ledger.paused != paused {
                        batch.entries.push(JournalEntry::new(if paused {
                            Event::Paused
                        } else {
                            Event::Resumed
                        }));
                        if !paused {
                            self.plan_deferred_failback(&mut batch);
                        }
                    }
                    batch.replies.push(Box::new(move |commit| {
                        let _ = reply.send(commit);
                    }));
                }
                Command::State { reply } => {
                    let _ = reply.send(self.state());
                }
                Command::Recent { limit, reply } => {
                    let _ = reply.send(
                        self.ledger
                            .recent
                            .iter()
                            .rev()
                            .take(limit)
                            .cloned()
                            .collect(),
                    );
                }
            }
        }
        let commit = self.journal.append(&mut batch.entries).map_err(|e| {
            tracing::error!(error = %e, "journal write failed; answering 500 and acting on nothing");
            RecordError::Journal(e.to_string())
        });
        // Only what is on disk changes the ledger; after a failed write it is as it was, so
        // Alertmanager's retry can act.
        if commit.is_ok() {
            for e in &batch.entries {
                self.ledger.apply(e);
            }
            self.metrics.paused.set(i64::from(self.ledger.paused));
            self.ledger.remember(&batch.entries);
            for (permit, queued) in batch.jobs {
                permit.send(queued);
            }
        }
        for reply in batch.replies {
            reply(commit.clone());
        }
    }
}

impl Recorder {
    /// Replays `history` (what `Journal::open` read), journals runs a previous process left
    /// unfinished as failed (they are not retried), and starts the recorder task.
    pub fn start(
        mut journal: Journal,
        history: Vec<JournalEntry>,
        rules: RuleSet,
        jobs: mpsc::Sender<Queued>,
        metrics: Metrics,
        inbox: usize,
    ) -> Result<Self, RecordError> {
        let mut ledger = Ledger {
            track_resolved: rules.offers_buttons(),
            ..Ledger::default()
        };
        for e in &history {
            ledger.apply(e);
        }
        ledger.remember(&history[history.len().saturating_sub(RECENT_CAPACITY)..]);
        let ended = |begun: &JournalEntry, detail: &str| JournalEntry {
            seq: 0,
            ts: JournalEntry::new(Event::Failed).ts,
            event: Event::Failed,
            detail: Some(detail.into()),
            ..begun.clone()
        };
        // Runs the last process left open end as failed, and are not retried: one that began
        // may have acted; one that did not is old news by now, its alert already answered.
        let mut interrupted: Vec<JournalEntry> = ledger
            .running
            .values()
            .map(|started| {
                ended(
                    started,
                    "interrupted: the actioner stopped while this ran; not retried",
                )
            })
            .chain(ledger.pending.values().map(|planned| {
                ended(
                    planned,
                    "interrupted: the actioner stopped before this began; not retried",
                )
            }))
            .collect();
        if !interrupted.is_empty() {
            tracing::warn!(
                count = interrupted.len(),
                "actions were interrupted by the last stop; journaled as failed, not retried"
            );
            journal
                .append(&mut interrupted)
                .map_err(|e| RecordError::Journal(e.to_string()))?;
            for e in &interrupted {
                ledger.apply(e);
            }
            ledger.remember(&interrupted);
        }
        metrics.paused.set(i64::from(ledger.paused));
        metrics.set_backend(ledger.fallback);
        // Targets left to a person before the restart stay so until their budget is back.
        let (max, window) = rules.repair_limit();
        let now = SystemTime::now();
        for target in &ledger.exhausted {
            if ledger.runs_within(ActionKind::Repair, target, window, now) >= max {
                let left = ledger.window_left(ActionKind::Repair, target, window, now);
                metrics.set_repair_exhausted_for(target, left);
            }
        }
        let (tx, mut rx) = mpsc::channel(inbox);
        let mut task = Task {
            journal,
            ledger,
            rules,
            jobs,
            metrics,
            manual_seq: 0,
            refusals: HashSet::new(),
        };
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut commands = vec![first];
                while commands.len() < BATCH {
                    match rx.try_recv() {
                        Ok(c) => commands.push(c),
                        Err(_) => break,
                    }
                }
                // The fsync blocks: keep it off the async workers.
                task = match tokio::task::spawn_blocking(move || {
                    task.run_batch(commands);
                    task
                })
                .await
                {
                    Ok(task) => task,
                    Err(err) => {
                        tracing::error!(%err, "the recorder failed; no more decisions until restart");
                        break;
                    }
                };
            }
        });
        Ok(Self { tx })
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, RecordError> {
        let (reply, rx) = oneshot::channel();
        self.tx.try_send(make(reply)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => RecordError::Overloaded,
            mpsc::error::TrySendError::Closed(_) => RecordError::Stopped,
        })?;
        rx.await.map_err(|_| RecordError::Stopped)
    }

    /// Decides and journals a webhook; `Ok` once it is on disk.
    pub async fn webhook(&self, payload: WebhookPayload) -> Result<WebhookReceipt, RecordError> {
        self.ask(|reply| Command::Webhook { payload, reply })
            .await?
    }

    /// Decides and journals a manual trigger; `Ok` gives the receiver of its outcome.
    pub async fn manual(
        &self,
        request: ManualRequest,
    ) -> Result<oneshot::Receiver<Outcome>, ManualError> {
        self.ask(|reply| Command::Manual { request, reply }).await?
    }

    /// Journals the executor's progress; `Ok` once on disk.
    pub async fn record(&self, entries: Vec<JournalEntry>) -> Result<(), RecordError> {
        // Progress reports wait for room rather than being refused: they are not load to shed.
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Record { entries, reply })
            .await
            .map_err(|_| RecordError::Stopped)?;
        rx.await.map_err(|_| RecordError::Stopped)?
    }

    /// Pauses or resumes automatic actions (journaled).
    pub async fn set_paused(&self, paused: bool) -> Result<(), RecordError> {
        self.ask(|reply| Command::Pause { paused, reply }).await?
    }

    /// Backend, pause and cooldowns.
    pub async fn state(&self) -> Result<StateView, RecordError> {
        self.ask(|reply| Command::State { reply }).await
    }

    /// The newest `limit` journal entries, newest first.
    pub async fn recent(&self, limit: usize) -> Result<Vec<JournalEntry>, RecordError> {
        self.ask(|reply| Command::Recent { limit, reply }).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(event: Event, key: &str, detail: Option<&str>) -> JournalEntry {
        JournalEntry {
            key: Some(key.into()),
            action: Some(ActionKind::Failback),
            detail: detail.map(Into::into),
            ..JournalEntry::new(event)
        }
    }

    #[test]
    fn a_repeat_refused_mid_run_leaves_the_run_open() {
        let mut ledger = Ledger::default();
        let key = "button:failback::fp@2026-11-22T21:00:00Z";
        ledger.apply(&at(Event::Planned, key, None));
        ledger.apply(&at(Event::Started, key, None));
        for why in [
            ManualError::AlreadyDone.to_string(),
            SkipReason::Duplicate.to_string(),
        ] {
            ledger.apply(&at(Event::Skipped, key, Some(&why)));
            assert!(ledger.running.contains_key(key), "{why}");
        }
        // A skip at action time ends it.
        ledger.apply(&at(
            Event::Skipped,
            key,
            Some("condition no longer true: vLLM is not healthy"),
        ));
        assert!(ledger.running.is_empty() && ledger.pending.is_empty());
        assert!(ledger.ran(key));
    }

    #[test]
    fn resolved_firings_are_remembered_from_received_entries() {
        let mut ledger = Ledger {
            track_resolved: true,
            ..Ledger::default()
        };
        let received = |status| JournalEntry {
            alert: Some(AlertRef {
                name: "A".into(),
                fingerprint: "fp".into(),
                status,
                starts_at: "2026-11-22T21:00:00Z".into(),
            }),
            ..JournalEntry::new(Event::Received)
        };
        ledger.apply(&received(AlertStatus::Firing));
        assert!(!ledger.has_resolved("fp@2026-11-22T21:00:00Z"));
        ledger.apply(&received(AlertStatus::Resolved));
        assert!(ledger.has_resolved("fp@2026-11-22T21:00:00Z"));
    }
}
