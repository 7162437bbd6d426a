//! The executor: runs planned jobs off the request path, each under its action's timeout, a
//! bounded number per action at once; "started" is on disk before an action acts, and its end
//! is journaled whatever it is.
//!
//! Runs that must not overlap share a lane and run one after the other, in the order they
//! were planned: runs of one action on one target, and failover and failback of one
//! vLLM/Ollama pair together (both move its backend). A failback planned while a failover still waits for
//! Ollama runs after it, and decides against the state it left. Lanes exist only while they
//! have work; no state is kept per target once its runs are done.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;

use crate::actions::{ActionError, Actions, Job, RunContext};
use crate::journal::{Event, JournalEntry};
use crate::metrics::Metrics;
use crate::planner::{Outcome, Queued};
use crate::recorder::{Begun, RecordError, Recorder};
use crate::vocab::{ActionKind, AwakeStamp, Origin, Reason, Skip};

/// How long the executor keeps trying to journal a run's start or end while the journal
/// cannot be written (a full disk may be freed), before it gives up on that run.
const JOURNAL_PATIENCE: Duration = Duration::from_secs(600);
/// How long a run that passed its timeout may go on finishing what it does (a container
/// stop, a rename) before it is cut off; the run's lane stays closed meanwhile.
const WIND_DOWN: Duration = Duration::from_secs(300);

/// Jobs planned and not ended, at most; past it webhooks are answered 503.
pub const QUEUE: usize = 1024;

/// The lane a job runs in, if it must not overlap others.
fn lane_of(job: &Job) -> Option<String> {
    let action = job.plan.action;
    if action.moves_backend() {
        // One lane per vLLM/Ollama pair: a node's failback never waits behind another's.
        Some(match &job.plan.target {
            Some(node) => format!("inference-backend/{node}"),
            None => "inference-backend".into(),
        })
    } else if action.takes_target() {
        job.plan.target.as_ref().map(|t| format!("{action}/{t}"))
    } else {
        None
    }
}

/// What every run needs.
struct Shared {
    actions: Actions,
    limits: HashMap<ActionKind, Arc<Semaphore>>,
    lanes: Mutex<HashMap<String, mpsc::UnboundedSender<Queued>>>,
    recorder: Recorder,
    metrics: Metrics,
}

/// Starts the executor on the receiving end of the recorder's job queue.
pub fn spawn(
    actions: Actions,
    recorder: Recorder,
    metrics: Metrics,
    mut jobs: mpsc::UnboundedReceiver<Queued>,
) -> JoinHandle<()> {
    let limits = actions
        .iter()
        .map(|(kind, action)| (*kind, Arc::new(Semaphore::new(action.concurrency().max(1)))))
        .collect();
    let shared = Arc::new(Shared {
        actions,
        limits,
        lanes: Mutex::default(),
        recorder,
        metrics,
    });
    tokio::spawn(async move {
        while let Some(queued) = jobs.recv().await {
            match lane_of(&queued.job) {
                None => {
                    let shared = shared.clone();
                    tokio::spawn(async move { shared.run(queued).await });
                }
                Some(lane) => shared.clone().enqueue(lane, queued),
            }
        }
    })
}

impl Shared {
    /// Journals `entries`, trying again while the journal cannot be written.
    async fn record(&self, entries: Vec<JournalEntry>) -> Result<(), RecordError> {
        self.patiently(|| self.recorder.record(entries.clone()))
            .await
    }

    /// Journals a run's start, trying again while the journal cannot be written.
    async fn begin(&self, started: JournalEntry, automatic: bool) -> Result<Begun, RecordError> {
        self.patiently(|| self.recorder.begin(started.clone(), automatic))
            .await
    }

    /// Runs `write` until it is not refused for a journal fault, for up to
    /// [`JOURNAL_PATIENCE`]: a run's start or end is never lost to a disk that fills for a
    /// moment.
    async fn patiently<T, F, Fut>(&self, mut write: F) -> Result<T, RecordError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, RecordError>>,
    {
        let deadline = Instant::now() + JOURNAL_PATIENCE;
        let mut wait = Duration::from_millis(50);
        loop {
            match write().await {
                Err(RecordError::Journal(why)) if Instant::now() < deadline => {
                    tracing::warn!(%why, retry_in = ?wait, "the journal cannot be written; trying again");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                other => return other,
            }
        }
    }

    fn lanes(&self) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::UnboundedSender<Queued>>> {
        self.lanes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues `queued` behind the runs of its lane, starting the lane if it is idle.
    fn enqueue(self: Arc<Self>, lane: String, queued: Queued) {
        let mut lanes = self.lanes();
        let queued = match lanes.get(&lane) {
            Some(tx) => match tx.send(queued) {
                Ok(()) => return,
                Err(returned) => returned.0,
            },
            None => queued,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(queued);
        lanes.insert(lane.clone(), tx);
        drop(lanes);
        tokio::spawn(self.clone().drain(lane, rx));
    }

    /// Runs a lane's jobs one by one; retires the lane when it is empty.
    async fn drain(self: Arc<Self>, lane: String, mut rx: mpsc::UnboundedReceiver<Queued>) {
        loop {
            let next = match rx.try_recv() {
                Ok(queued) => Some(queued),
                Err(_) => {
                    // Jobs are queued under this lock: empty now means empty for good.
                    let mut lanes = self.lanes();
                    match rx.try_recv() {
                        Ok(queued) => Some(queued),
                        Err(_) => {
                            lanes.remove(&lane);
                            None
                        }
                    }
                }
            };
            let Some(queued) = next else { return };
            self.run(queued).await;
        }
    }

    async fn run(&self, queued: Queued) {
        let Queued {
            job,
            outcome: reply,
            budget,
        } = queued;
        let outcome = self.execute(&job).await;
        drop(budget);
        if let Some(reply) = reply {
            let _ = reply.send(outcome);
        }
    }

    async fn execute(&self, job: &Job) -> Outcome {
        let kind = job.plan.action;
        let entry = |event| JournalEntry {
            force: job.force,
            ..JournalEntry::run(event, &job.key, &job.plan, job.alert_ref.as_ref())
        };
        let (Some(action), Some(limit)) = (self.actions.get(&kind), self.limits.get(&kind)) else {
            let why = format!("the {kind} action is not available in this config");
            self.metrics.count(kind, "failed");
            let failed = JournalEntry {
                reason: Some(Reason::Unavailable),
                ..entry(Event::Failed).with_detail(&why)
            };
            let _ = self.record(vec![failed]).await;
            return Outcome::Failed(why);
        };
        if job.plan.dry_run {
            // A dry run does nothing: it takes none of the action's places.
            let what = action.describe(job);
            self.metrics.count(kind, "dry_run");
            let skip = Skip::DryRun(what.clone());
            let _ = self
                .record(vec![entry(Event::Skipped).because(&skip)])
                .await;
            return Outcome::DryRun(what);
        }
        let Ok(_slot) = limit.acquire().await else {
            return Outcome::Failed("shutting down".into());
        };
        // What the ledger knew before this run began (a suspend's grace counts from the
        // previous one, not from itself).
        let context = RunContext {
            last_suspend: self.recorder.snapshot().last_suspend.clone(),
        };
        // On disk before anything is done: a crash from here on shows as interrupted, not
        // retried. An automatic run whose turn comes while paused is held instead.
        let started_entry = JournalEntry {
            awake: Some(AwakeStamp::now()),
            ..entry(Event::Started)
        };
        let automatic = job.plan.origin == Origin::Rule;
        match self.begin(started_entry, automatic).await {
            Ok(Begun::Started) => {}
            Ok(Begun::Held) => {
                self.metrics.count(kind, "skipped");
                return Outcome::Skipped(Skip::Paused.to_string());
            }
            Err(err) => {
                self.metrics.count(kind, "failed");
                return Outcome::Failed(format!("not started: {err}"));
            }
        }
        let started = Instant::now();
        // The action runs as a task of its own: a timeout stops the wait, not the action, which
        // may be half-way through something that must be finished or undone.
        let task = {
            let (action, job, context) = (action.clone(), job.clone(), context.clone());
            tokio::spawn(async move { action.run(&job, &context).await })
        };
        tokio::pin!(task);
        let result = match tokio::time::timeout(action.timeout(), &mut task).await {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(join)) => Ok(Err(ActionError::Failed(format!(
                "the action failed: {join}"
            )))),
            Err(elapsed) => Err(elapsed),
        };
        let elapsed = started.elapsed();
        let timed_out = result.is_err();
        let (end, result_label, outcome) = match result {
            Ok(Ok(done)) => (
                entry(Event::Succeeded).with_detail(&done),
                "ok",
                Outcome::Succeeded(done),
            ),
            Ok(Err(ActionError::ConditionGone(why))) => {
                let skip = Skip::ConditionGone(why);
                (
                    entry(Event::Skipped).because(&skip),
                    "skipped",
                    Outcome::Skipped(skip.to_string()),
                )
            }
            Ok(Err(ActionError::Failed(why))) => (
                JournalEntry {
                    reason: Some(Reason::Error),
                    ..entry(Event::Failed).with_detail(&why)
                },
                "failed",
                Outcome::Failed(why),
            ),
            Err(_) => {
                let why = format!("timed out after {:?}", action.timeout());
                (
                    JournalEntry {
                        reason: Some(Reason::TimedOut),
                        ..entry(Event::Failed).with_detail(&why)
                    },
                    "failed",
                    Outcome::Failed(why),
                )
            }
        };
        if end.event == Event::Failed {
            tracing::warn!(action = %kind, key = %job.key, error = end.detail.as_deref().unwrap_or_default(), "action failed");
        }
        if let Err(err) = self.record(vec![end]).await {
            tracing::error!(action = %kind, key = %job.key, %err, "could not journal the end of an action");
        }
        if timed_out && tokio::time::timeout(WIND_DOWN, &mut task).await.is_err() {
            tracing::warn!(action = %kind, key = %job.key, "the action went on past its timeout and was cut off");
            task.abort();
        }
        self.metrics.count(kind, result_label);
        self.metrics.observe_duration(kind, elapsed);
        if let Some(since) = job.alert.as_ref().and_then(|a| a.started())
            && let Ok(age) = SystemTime::now().duration_since(since)
        {
            self.metrics.observe_alert_to_action(kind, age);
        }
        outcome
    }
}
