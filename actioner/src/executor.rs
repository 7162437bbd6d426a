//! The executor: runs planned jobs off the request path. One job per target at a time, a
//! bounded number per action at a time, each under its action's timeout; "started" is on disk
//! before an action acts, and its end is journaled whatever it is.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;

use crate::actions::{ActionError, Actions, Job};
use crate::config::ActionKind;
use crate::journal::{AlertRef, Event, JournalEntry};
use crate::metrics::{ActionLabel, Metrics};
use crate::recorder::{Outcome, Queued, Recorder};
use crate::rules::SkipReason;

/// Capacity of the action queue; past it webhooks are answered 503.
pub const QUEUE: usize = 1024;

fn entry(event: Event, job: &Job, detail: Option<String>) -> JournalEntry {
    JournalEntry {
        key: Some(job.key.clone()),
        rule: Some(job.plan.rule.clone()),
        action: Some(job.plan.action),
        target: job.plan.target.clone(),
        alert: job.alert.as_ref().map(AlertRef::from),
        dry_run: job.plan.dry_run,
        detail,
        ..JournalEntry::new(event)
    }
}

/// Per-target locks: jobs on one target run one after the other.
#[derive(Debug, Default)]
struct TargetLocks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl TargetLocks {
    fn get(&self, target: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(target.to_owned())
            .or_default()
            .clone()
    }
}

/// Starts the executor on the receiving end of the recorder's job queue.
pub fn spawn(
    actions: Actions,
    recorder: Recorder,
    metrics: Metrics,
    mut jobs: mpsc::Receiver<Queued>,
) -> JoinHandle<()> {
    let limits: HashMap<ActionKind, Arc<Semaphore>> = actions
        .iter()
        .map(|(kind, action)| (*kind, Arc::new(Semaphore::new(action.concurrency().max(1)))))
        .collect();
    let actions = Arc::new(actions);
    let limits = Arc::new(limits);
    let locks = Arc::new(TargetLocks::default());
    tokio::spawn(async move {
        while let Some(queued) = jobs.recv().await {
            let (actions, limits, locks, recorder, metrics) = (
                actions.clone(),
                limits.clone(),
                locks.clone(),
                recorder.clone(),
                metrics.clone(),
            );
            tokio::spawn(async move {
                let outcome = run(queued.job, &actions, &limits, &locks, &recorder, &metrics).await;
                if let Some(tx) = queued.outcome {
                    let _ = tx.send(outcome);
                }
            });
        }
    })
}

async fn run(
    job: Job,
    actions: &Actions,
    limits: &HashMap<ActionKind, Arc<Semaphore>>,
    locks: &TargetLocks,
    recorder: &Recorder,
    metrics: &Metrics,
) -> Outcome {
    let kind = job.plan.action;
    let name = kind.name();
    let (Some(action), Some(limit)) = (actions.get(&kind), limits.get(&kind)) else {
        let why = format!("the {name} action is not available in this build or config");
        metrics.count(name, "failed");
        let _ = recorder
            .record(vec![entry(Event::Failed, &job, Some(why.clone()))])
            .await;
        return Outcome::Failed(why);
    };
    let lock = job
        .plan
        .target
        .as_deref()
        .map(|t| locks.get(&format!("{name}/{t}")));
    let _serial = match &lock {
        Some(lock) => Some(lock.lock().await),
        None => None,
    };
    let Ok(_slot) = limit.acquire().await else {
        return Outcome::Failed("shutting down".into());
    };

    if job.plan.dry_run {
        let what = action.describe(&job);
        metrics.count(name, "dry_run");
        let _ = recorder
            .record(vec![entry(
                Event::Skipped,
                &job,
                Some(format!("dry-run: {what}")),
            )])
            .await;
        return Outcome::DryRun(what);
    }
    // On disk before anything is done: a crash from here on shows as interrupted, not retried.
    if let Err(err) = recorder
        .record(vec![entry(Event::Started, &job, None)])
        .await
    {
        metrics.count(name, "failed");
        return Outcome::Failed(format!("not started: {err}"));
    }
    let started = Instant::now();
    let result = tokio::time::timeout(action.timeout(), action.run(&job)).await;
    let elapsed = started.elapsed();
    let (event, result_label, outcome) = match result {
        Ok(Ok(done)) => (Event::Succeeded, "ok", Outcome::Succeeded(done)),
        Ok(Err(ActionError::ConditionGone(why))) => (
            Event::Skipped,
            "skipped",
            Outcome::Skipped(SkipReason::ConditionGone(why).to_string()),
        ),
        Ok(Err(ActionError::Failed(why))) => (Event::Failed, "failed", Outcome::Failed(why)),
        Err(_) => (
            Event::Failed,
            "failed",
            Outcome::Failed(format!("timed out after {:?}", action.timeout())),
        ),
    };
    let detail = match &outcome {
        Outcome::Succeeded(d) | Outcome::Failed(d) | Outcome::Skipped(d) | Outcome::DryRun(d) => {
            d.clone()
        }
    };
    if event == Event::Failed {
        tracing::warn!(action = name, key = %job.key, error = %detail, "action failed");
    }
    if let Err(err) = recorder
        .record(vec![entry(event, &job, Some(detail))])
        .await
    {
        tracing::error!(action = name, key = %job.key, %err, "could not journal the end of an action");
    }
    metrics.count(name, result_label);
    if kind == ActionKind::Repair && matches!(event, Event::Succeeded | Event::Skipped) {
        metrics.clear_repair_exhausted(job.plan.target.as_deref().unwrap_or_default());
    }
    if event == Event::Succeeded && matches!(kind, ActionKind::Failover | ActionKind::Failback) {
        metrics.set_backend(kind == ActionKind::Failover);
    }
    let label = ActionLabel {
        action: name.to_owned(),
    };
    metrics
        .action_duration
        .get_or_create(&label)
        .observe(elapsed.as_secs_f64());
    if let Some(since) = job.alert.as_ref().and_then(|a| a.started())
        && let Ok(age) = SystemTime::now().duration_since(since)
    {
        metrics
            .alert_to_action
            .get_or_create(&label)
            .observe(age.as_secs_f64());
    }
    outcome
}
