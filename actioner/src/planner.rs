//! The planner: turns the commands of one batch — webhooks, runs people ask for, a resume —
//! into journal entries and jobs, by the [`Policy`] against the [`Ledger`]. It decides; the
//! recorder commits what it decided (or, when the journal cannot be written, drops it) and
//! only then releases the jobs.
//!
//! Jobs take room: one of [`crate::executor::QUEUE`] places and, for runs about an alert, its
//! bytes against [`ALERT_BYTES_QUEUED`]. Without room a run is skipped as overloaded, and the
//! webhook is answered 503 for Alertmanager to retry.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::actions::{Job, RawWake};
use crate::alert::{Alert, AlertStatus, WebhookPayload};
use crate::journal::{AlertRef, Event, JournalEntry, KeyHash};
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::policy::{Policy, Request, Tentative};
use crate::vocab::{ActionKind, Plan, Reason, RunKey, Skip, Timestamp};

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
    /// Its place among the jobs not ended, and its alert's bytes; freed when it ends.
    pub budget: Budget,
}

/// What a job holds until it ends: one of [`crate::executor::QUEUE`] places, and its alert's
/// bytes against [`ALERT_BYTES_QUEUED`].
#[derive(Debug)]
pub struct Budget {
    _slot: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// What a webhook came to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WebhookReceipt {
    /// Alerts received.
    pub received: usize,
    /// Actions planned.
    pub planned: usize,
}

/// A run a person asks for, with the relay's explicit MAC if that is what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManualRequest {
    /// What the policy judges.
    pub request: Request,
    /// The relay's explicit destination.
    pub raw_wake: Option<RawWake>,
    /// A manual failback that skips its GPU check.
    pub force: bool,
    /// The node it is about, for re-checks on that node's exporter.
    pub node: Option<String>,
}

/// Distinct once-only refusals remembered, so that presses repeated in a flood are journaled
/// once per start (and counted every time).
const REFUSALS_REMEMBERED: usize = 4096;
/// Alert bytes (labels and annotations) queued jobs may hold at once; past it webhooks are
/// answered 503.
pub const ALERT_BYTES_QUEUED: usize = 64 << 20;

/// Some runs found no room (the action queue or the alert bytes are full).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overloaded;

/// Why a run a person asked for was not planned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The policy said no (journaled).
    Policy(Skip),
    /// No room for it.
    Overloaded,
}

/// What a batch decided, released only after its journal write succeeded.
#[derive(Default)]
pub struct Batch {
    /// Its journal entries, in order.
    pub entries: Vec<JournalEntry>,
    /// Its jobs.
    pub jobs: Vec<Queued>,
    /// What it planned so far, for the decisions after.
    pub tentative: Tentative,
    /// Once-only refusals it journals, remembered once the batch is on disk.
    refusals: Vec<KeyHash>,
}

impl Batch {
    /// Plans `job`: its `planned` entry, what later decisions of the batch see, the job.
    fn plan(
        &mut self,
        planned: JournalEntry,
        job: Job,
        outcome: Option<oneshot::Sender<Outcome>>,
        budget: Budget,
    ) {
        self.entries.push(planned);
        self.tentative.planned(&job.key, &job.plan);
        self.jobs.push(Queued {
            job,
            outcome,
            budget,
        });
    }
}

/// Decides, with the room jobs may take.
pub struct Planner {
    policy: Policy,
    slots: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    metrics: Metrics,
    manual_seq: u64,
    /// Digests of once-only refusals journaled since the start (key and reason).
    refusals: HashSet<KeyHash>,
}

impl Planner {
    /// Decides by `policy`; counts what it skips in `metrics`.
    pub fn new(policy: Policy, metrics: Metrics) -> Self {
        Self {
            policy,
            slots: Arc::new(Semaphore::new(crate::executor::QUEUE)),
            bytes: Arc::new(Semaphore::new(ALERT_BYTES_QUEUED)),
            metrics,
            manual_seq: 0,
            refusals: HashSet::new(),
        }
    }

    /// The policy, for the ledger's snapshot.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// `batch` is on disk: its refusals count as journaled.
    pub fn committed(&mut self, batch: &Batch) {
        for refusal in &batch.refusals {
            if self.refusals.len() >= REFUSALS_REMEMBERED {
                self.refusals.clear();
            }
            self.refusals.insert(*refusal);
        }
    }

    /// A place for a job holding `alert`, or `None` when too many wait.
    fn reserve(&self, alert: Option<&Alert>) -> Option<Budget> {
        let bytes = match alert {
            Some(alert) => {
                let bytes = u32::try_from(alert.size_bytes()).unwrap_or(u32::MAX);
                Some(
                    self.bytes
                        .clone()
                        .try_acquire_many_owned(bytes.max(1))
                        .ok()?,
                )
            }
            None => None,
        };
        let slot = self.slots.clone().try_acquire_owned().ok()?;
        Some(Budget {
            _slot: slot,
            _bytes: bytes,
        })
    }

    /// Decides every alert of a webhook into `batch`; `Err` when some runs found no room
    /// (they are journaled as skipped, overloaded, and Alertmanager's retry may run them).
    pub fn webhook(
        &mut self,
        ledger: &Ledger,
        payload: WebhookPayload,
        batch: &mut Batch,
    ) -> Result<WebhookReceipt, Overloaded> {
        if payload.truncated_alerts > 0 {
            tracing::warn!(truncated = payload.truncated_alerts, receiver = %payload.receiver, "Alertmanager left alerts out of this webhook (max_alerts)");
        }
        let now = SystemTime::now();
        let mut receipt = WebhookReceipt {
            received: payload.alerts.len(),
            planned: 0,
        };
        let external_url: Arc<str> = payload.external_url.into();
        let mut overloaded = false;
        for alert in payload.alerts {
            let alert = Arc::new(alert);
            let alert_ref = AlertRef::from(&*alert);
            if ledger.tracks_resolved() && alert.status == AlertStatus::Resolved {
                batch.tentative.resolved(alert_ref.firing());
            }
            let verdicts = self.policy.for_alert(ledger, &batch.tentative, &alert, now);
            batch.entries.push(JournalEntry {
                alert: Some(alert_ref.clone()),
                ..JournalEntry::new(Event::Received)
                    .with_detail(format!("{} rule(s) match", verdicts.len()))
            });
            for (key, plan, verdict) in verdicts {
                let skip = verdict.err();
                let reserved = match skip {
                    Some(_) => None,
                    None => self.reserve(Some(&alert)),
                };
                let Some(budget) = reserved else {
                    let skip = skip.unwrap_or_else(|| {
                        overloaded = true;
                        Skip::Overloaded
                    });
                    if let Skip::Exhausted { .. } = skip {
                        tracing::warn!(repair_target = plan.target.as_deref().unwrap_or_default(), rule = %plan.rule, "repairs exhausted; leaving it to a person");
                    }
                    self.metrics.count(plan.action, "skipped");
                    batch.entries.push(
                        JournalEntry::run(Event::Skipped, &key, &plan, Some(&alert_ref))
                            .because(&skip),
                    );
                    continue;
                };
                let planned = JournalEntry::run(Event::Planned, &key, &plan, Some(&alert_ref));
                let job = Job {
                    key,
                    plan,
                    alert: Some(alert.clone()),
                    alert_ref: Some(alert_ref.clone()),
                    external_url: external_url.clone(),
                    raw_wake: None,
                    force: false,
                    node: alert.host(),
                };
                batch.plan(planned, job, None, budget);
                receipt.planned += 1;
            }
        }
        if overloaded {
            Err(Overloaded)
        } else {
            Ok(receipt)
        }
    }

    /// At a resume: the failbacks rules wanted while paused (one per pair), where the pair is
    /// still on its fallback. Each runs with its usual re-check (vLLM must come up healthy).
    pub fn deferred_failbacks(&mut self, ledger: &Ledger, batch: &mut Batch) {
        let deferred: Vec<JournalEntry> = ledger.deferred_failbacks().cloned().collect();
        for skipped in deferred {
            self.deferred_failback(ledger, skipped, batch);
        }
    }

    fn deferred_failback(&mut self, ledger: &Ledger, skipped: JournalEntry, batch: &mut Batch) {
        let Some(key) = skipped.key.clone() else {
            return;
        };
        let pair = skipped.target.clone().unwrap_or_default();
        // Held back under another config (one pair for the cluster then, a pair per node now,
        // or the other way round, or a node since removed): there is no such pair to move.
        if !self.policy.rules().allowlists().has_pair(&pair) {
            let skip = if pair.is_empty() {
                Skip::NoTarget(ActionKind::Failback)
            } else {
                Skip::NotAllowlisted(ActionKind::Failback, pair)
            };
            batch
                .entries
                .push(skipped.next(Event::Skipped).because(&skip));
            return;
        }
        // On the fallback, or about to be (a failover still running): the failback then
        // waits in the pair's lane and decides against the state the failover left. A
        // paused skip is never a repeat of a run that went (the once-only check comes first),
        // so the key may have been planned only by a run held at its start.
        let on_fallback = ledger.backend(&pair).0 == crate::vocab::Backend::Fallback;
        if !(on_fallback || batch.tentative.backend_moving(ledger, &pair))
            || batch.tentative.planned_key(&key)
        {
            return;
        }
        let plan = Plan {
            rule: skipped.rule.clone().unwrap_or_default(),
            action: ActionKind::Failback,
            target: skipped.target.clone(),
            dry_run: skipped.dry_run,
            cooldown: None,
            origin: crate::vocab::Origin::Rule,
        };
        // Now, not when it was skipped: the time counts for cooldowns.
        let Some(budget) = self.reserve(None) else {
            batch
                .entries
                .push(skipped.next(Event::Skipped).because(&Skip::Overloaded));
            return;
        };
        let planned = skipped
            .next(Event::Planned)
            .with_detail("deferred: the alert resolved while paused");
        let job = Job {
            key,
            plan,
            alert: None,
            node: skipped.alert.as_ref().and_then(|a| a.host.clone()),
            alert_ref: skipped.alert.clone(),
            external_url: Arc::from(""),
            raw_wake: None,
            force: false,
        };
        batch.plan(planned, job, None, budget);
    }

    /// Decides a run a person asked for into `batch`; `Ok` gives the receiver of its outcome.
    pub fn manual(
        &mut self,
        ledger: &Ledger,
        manual: ManualRequest,
        batch: &mut Batch,
    ) -> Result<oneshot::Receiver<Outcome>, Refused> {
        self.manual_seq += 1;
        let request = &manual.request;
        let key = match &request.once {
            Some(once) => once.key.clone(),
            None => RunKey::manual(Timestamp::now(), self.manual_seq),
        };
        let (mut plan, verdict) =
            self.policy
                .for_request(ledger, &batch.tentative, request, &key, SystemTime::now());
        if let Err(skip) = verdict {
            self.metrics.count(plan.action, "skipped");
            // Anyone who saw a button can press it again and again: each distinct refusal of
            // it is journaled once per start, not once per press.
            let first = request.once.is_none() || {
                let refusal = KeyHash::of(&format!("{key}\n{:?}", skip.reason()));
                let known = self.refusals.contains(&refusal) || batch.refusals.contains(&refusal);
                if !known {
                    batch.refusals.push(refusal);
                }
                !known
            };
            if first {
                // A refused target is named in the words only: it is not an allowlisted one.
                plan.target = plan
                    .target
                    .filter(|_| skip.reason() != Reason::NotAllowlisted);
                batch
                    .entries
                    .push(JournalEntry::run(Event::Skipped, &key, &plan, None).because(&skip));
            }
            return Err(Refused::Policy(skip));
        }
        let Some(budget) = self.reserve(None) else {
            return Err(Refused::Overloaded);
        };
        let mut planned = JournalEntry::run(Event::Planned, &key, &plan, None);
        planned.force = manual.force;
        if let Some(node) = &manual.node {
            planned = planned.with_detail(format!("re-check on node {node}"));
        }
        if let Some(raw) = &manual.raw_wake {
            planned = planned.with_detail(format!(
                "relay: magic packet for {} to {}:{}",
                raw.mac, raw.broadcast, raw.port
            ));
        }
        let (tx, rx) = oneshot::channel();
        let job = Job {
            key,
            plan,
            alert: None,
            alert_ref: None,
            external_url: Arc::from(""),
            raw_wake: manual.raw_wake,
            force: manual.force,
            node: manual.node,
        };
        batch.plan(planned, job, Some(tx), budget);
        Ok(rx)
    }
}
