//! The recorder: the one task that decides and journals. Webhooks, manual triggers, buttons,
//! the wake relay, pause and the executor's progress reports all pass through it, so every
//! decision is made by the [`Policy`] against one consistent [`Ledger`] and is on disk before
//! anyone is answered or anything acts.
//!
//! Commands arriving together are decided together and committed with one fsync (group
//! commit), which is what lets a journal that syncs every decision take thousands of webhooks
//! a second. A full inbox, a full action queue or too many alert bytes waiting answer
//! "overloaded" (503), so Alertmanager retries later; a journal that cannot be written answers
//! an error (500), nothing acts, and the ledger stays as the disk says. After each batch the
//! ledger's [`Snapshot`] is published for the API and `/metrics`.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::{mpsc, oneshot, watch};

use crate::alert::WebhookPayload;
use crate::journal::{Event, Journal, JournalEntry, JournalError};
use crate::ledger::{Ledger, Snapshot};
use crate::metrics::Metrics;
use crate::planner::{
    Batch, ManualRequest, Outcome, Overloaded, Planner, Queued, Refused, WebhookReceipt,
};
use crate::policy::Policy;
use crate::vocab::{Reason, Skip};

/// Why the recorder could not take a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Inbox or action queue full: try again later (503).
    #[error("overloaded: try again later")]
    Overloaded,
    /// The journal could not be written (500).
    #[error("journal unavailable: {0}")]
    Journal(String),
    /// The recorder stopped (shutdown, or it failed).
    #[error("the recorder stopped")]
    Stopped,
}

/// Why a run a person asked for was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The policy said no.
    #[error("{0}")]
    Policy(Skip),
    /// As for webhooks.
    #[error(transparent)]
    Record(#[from] RecordError),
}

/// How the start of a run was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Begun {
    /// "started" is on disk: act.
    Started,
    /// An automatic run whose turn came while paused: journaled as skipped (paused), and a
    /// failback is kept for the resume.
    Held,
}

/// Commands decided in one batch at most.
const BATCH: usize = 512;

enum Command {
    Webhook {
        payload: WebhookPayload,
        reply: oneshot::Sender<Result<WebhookReceipt, RecordError>>,
    },
    Manual {
        request: ManualRequest,
        reply: oneshot::Sender<Result<oneshot::Receiver<Outcome>, Refusal>>,
    },
    Record {
        entries: Vec<JournalEntry>,
        reply: oneshot::Sender<Result<(), RecordError>>,
    },
    Begin {
        started: JournalEntry,
        automatic: bool,
        reply: oneshot::Sender<Result<Begun, RecordError>>,
    },
    Pause {
        paused: bool,
        reply: oneshot::Sender<Result<(), RecordError>>,
    },
}

/// A handle on the recorder task; cheap to clone.
#[derive(Debug, Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Command>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    jobs: mpsc::UnboundedSender<Queued>,
}

/// An answer deferred until the batch's journal write is known.
type Reply = Box<dyn FnOnce(Result<(), RecordError>) + Send>;

/// What the recorder owns.
struct Task {
    journal: Journal,
    ledger: Ledger,
    planner: Planner,
    jobs: mpsc::UnboundedSender<Queued>,
    metrics: Metrics,
    snapshot: watch::Sender<Arc<Snapshot>>,
}

impl Task {
    /// Decides a batch of commands, commits its journal entries with one fsync, then releases
    /// its jobs and answers.
    fn run_batch(&mut self, commands: Vec<Command>) {
        let mut batch = Batch::default();
        let mut replies: Vec<Reply> = Vec::with_capacity(commands.len());
        for command in commands {
            match command {
                Command::Webhook { payload, reply } => {
                    let result = self
                        .planner
                        .webhook(&self.ledger, payload, &mut batch)
                        .map_err(|Overloaded| RecordError::Overloaded);
                    replies.push(Box::new(move |commit| {
                        let _ = reply.send(commit.and(result));
                    }));
                }
                Command::Manual { request, reply } => {
                    let result = self
                        .planner
                        .manual(&self.ledger, request, &mut batch)
                        .map_err(|refused| match refused {
                            Refused::Policy(skip) => Refusal::Policy(skip),
                            Refused::Overloaded => Refusal::Record(RecordError::Overloaded),
                        });
                    replies.push(Box::new(move |commit| {
                        let _ = reply.send(commit.map_err(Refusal::Record).and(result));
                    }));
                }
                Command::Record { entries, reply } => {
                    batch.entries.extend(entries);
                    replies.push(Box::new(move |commit| {
                        let _ = reply.send(commit);
                    }));
                }
                Command::Begin {
                    started,
                    automatic,
                    reply,
                } => {
                    // No automatic run begins while paused, even one planned before the pause
                    // that waited in its lane.
                    let begun = if automatic && batch.tentative.paused(&self.ledger) {
                        let held = JournalEntry {
                            ts: started.ts,
                            awake: None,
                            ..started.next(Event::Skipped)
                        };
                        batch.entries.push(held.because(&Skip::Paused));
                        Begun::Held
                    } else {
                        batch.entries.push(started);
                        Begun::Started
                    };
                    replies.push(Box::new(move |commit| {
                        let _ = reply.send(commit.map(|()| begun));
                    }));
                }
                Command::Pause { paused, reply } => {
                    if batch.tentative.paused(&self.ledger) != paused {
                        batch.tentative.set_paused(paused);
                        if !paused {
                            self.planner.deferred_failbacks(&self.ledger, &mut batch);
                        }
                        let event = if paused {
                            Event::Paused
                        } else {
                            Event::Resumed
                        };
                        batch.entries.push(JournalEntry::new(event));
                    }
                    replies.push(Box::new(move |commit| {
                        let _ = reply.send(commit);
                    }));
                }
            }
        }
        let commit = self.journal.append(&mut batch.entries).map_err(|e| {
            stop_if_fenced(&e);
            tracing::error!(error = %e, "journal write failed; answering 500 and acting on nothing");
            self.metrics.journal_error("write");
            RecordError::Journal(e.to_string())
        });
        // Only what is on disk changes the ledger; after a failed write it is as it was, so
        // Alertmanager's retry can act.
        if commit.is_ok() {
            self.planner.committed(&batch);
            for entry in batch.entries {
                self.ledger.apply(entry);
            }
            for queued in batch.jobs {
                // Only a stopped executor refuses; /healthz says so.
                let _ = self.jobs.send(queued);
            }
            self.rotate_if_due();
        }
        self.publish();
        for reply in replies {
            reply(commit.clone());
        }
    }

    /// Begins a new journal file with a checkpoint once the current one is full.
    fn rotate_if_due(&mut self) {
        if !self.journal.wants_rotation() {
            return;
        }
        let mut checkpoint = self.ledger.checkpoint();
        match self.journal.rotate(&mut checkpoint) {
            Ok(()) => tracing::info!(parts = checkpoint.len(), "journal rotated"),
            Err(err) => {
                stop_if_fenced(&err);
                self.metrics.journal_error("rotate");
                tracing::warn!(%err, "journal rotation failed; the current file grows on and rotation is tried again at the next write");
            }
        }
    }

    fn publish(&self) {
        let failure = self.journal.failure().map(ToString::to_string);
        let snapshot = self
            .planner
            .policy()
            .snapshot(&self.ledger, SystemTime::now(), failure);
        self.snapshot.send_replace(Arc::new(snapshot));
    }
}

impl Recorder {
    /// Journals the runs a previous process left open as failed (interrupted: they are not
    /// retried), publishes the ledger and starts the recorder task.
    pub fn start(
        mut journal: Journal,
        mut ledger: Ledger,
        policy: Policy,
        jobs: mpsc::UnboundedSender<Queued>,
        metrics: Metrics,
        snapshot: watch::Sender<Arc<Snapshot>>,
        inbox: usize,
    ) -> Result<Self, RecordError> {
        // One that began may have acted; one that did not is old news by now, its alert
        // already answered.
        let mut interrupted: Vec<JournalEntry> = ledger
            .open_runs()
            .map(|run| {
                let why = if run.started {
                    "interrupted: the actioner stopped while this ran; not retried"
                } else {
                    "interrupted: the actioner stopped before this began; not retried"
                };
                JournalEntry {
                    reason: Some(Reason::Interrupted),
                    ..run.entry.next(Event::Failed).with_detail(why)
                }
            })
            .collect();
        if !interrupted.is_empty() {
            tracing::warn!(
                count = interrupted.len(),
                "actions were interrupted by the last stop; journaled as failed, not retried"
            );
            journal.append(&mut interrupted).map_err(|e| {
                stop_if_fenced(&e);
                RecordError::Journal(e.to_string())
            })?;
            for entry in interrupted {
                ledger.apply(entry);
            }
        }
        let (tx, mut rx) = mpsc::channel(inbox);
        let mut task = Task {
            journal,
            ledger,
            planner: Planner::new(policy, metrics.clone()),
            jobs: jobs.clone(),
            metrics,
            snapshot,
        };
        task.publish();
        let snapshot = task.snapshot.subscribe();
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
        Ok(Self { tx, snapshot, jobs })
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

    /// Decides and journals a run a person asked for; `Ok` gives the receiver of its outcome.
    pub async fn manual(
        &self,
        request: ManualRequest,
    ) -> Result<oneshot::Receiver<Outcome>, Refusal> {
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

    /// Journals the start of a run; an automatic one is held instead while paused.
    pub async fn begin(
        &self,
        started: JournalEntry,
        automatic: bool,
    ) -> Result<Begun, RecordError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Begin {
                started,
                automatic,
                reply,
            })
            .await
            .map_err(|_| RecordError::Stopped)?;
        rx.await.map_err(|_| RecordError::Stopped)?
    }

    /// Pauses or resumes automatic actions (journaled).
    pub async fn set_paused(&self, paused: bool) -> Result<(), RecordError> {
        self.ask(|reply| Command::Pause { paused, reply }).await?
    }

    /// The ledger as of the last batch.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// A receiver of the ledger's snapshots.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.clone()
    }

    /// `Ok` while decisions can be made and journaled; otherwise what stops them.
    pub fn health(&self) -> Result<(), String> {
        if self.tx.is_closed() {
            return Err("the recorder stopped: no decisions until a restart".into());
        }
        if self.jobs.is_closed() {
            return Err("the executor stopped: no actions until a restart".into());
        }
        match &self.snapshot.borrow().journal_failure {
            Some(failure) => Err(format!("the journal cannot be written: {failure}")),
            None => Ok(()),
        }
    }
}

/// Past the fence another replica may lead and write this journal: nothing of this one may go
/// on — no unwinding, no waiting for running actions — as when the lease is lost.
fn stop_if_fenced(err: &JournalError) {
    if let JournalError::Fenced(_) = err {
        tracing::error!(error = %err, "stopping at once, so that only the leader acts");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn health_fails_when_the_recorder_the_executor_or_the_journal_does() {
        let (tx, rx) = mpsc::channel(1);
        let (jobs, jobs_rx) = mpsc::unbounded_channel();
        let (snapshot_tx, snapshot) = watch::channel(Arc::new(Snapshot::default()));
        let recorder = Recorder { tx, snapshot, jobs };
        assert_eq!(recorder.health(), Ok(()));
        snapshot_tx.send_replace(Arc::new(Snapshot {
            journal_failure: Some("journal.jsonl: write: No space left on device".into()),
            ..Snapshot::default()
        }));
        assert!(recorder.health().unwrap_err().contains("No space left"));
        drop(jobs_rx);
        assert!(recorder.health().unwrap_err().contains("executor stopped"));
        // The recorder task ended (it panicked, say): its inbox is gone.
        drop(rx);
        assert!(recorder.health().unwrap_err().contains("recorder stopped"));
        assert_eq!(recorder.set_paused(true).await, Err(RecordError::Stopped));
    }
}
