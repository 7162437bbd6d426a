//! Attacks on the recorder's batches and the executor's lanes: decisions made together in one
//! batch, runs queued behind a lane when the state changes, journal faults between planning
//! and acting.
//!
//! Each test's comment tells what the attack did before the code was mended; its name, what
//! must hold now.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use aistack_actioner::actions::Actions;
use aistack_actioner::alert::parse_payload;
use aistack_actioner::build_actions;
use aistack_actioner::config::Config;
use aistack_actioner::journal::{Event, FaultPlan, Journal, JournalLimits, Op};
use aistack_actioner::ledger::{Ledger, Snapshot};
use aistack_actioner::metrics::Metrics;
use aistack_actioner::policy::{Policy, RepairBudget};
use aistack_actioner::recorder::Recorder;
use aistack_actioner::rules::RuleSet;
use aistack_actioner::vocab::{ActionKind, Reason};
use tokio::sync::{mpsc, watch};

mod support;
use support::{
    DOCKER_FAILOVER, GAMING_DRY_RULES, GAMING_RULES, api, config, failed_over_before, one_alert,
    post_ok, read_journal, stand_ins, start, start_with,
};

/// POST /api/v1/pause then POST /api/v1/resume, both answered 200, decided in one batch (the
/// recorder was busy with an fsync when they came): the resume is dropped, because the second
/// command compares against the ledger, which does not yet hold the first one's entry.
/// Automatic actions stay paused though the last word was "resume".
#[tokio::test(flavor = "current_thread")]
async fn a_resume_right_after_a_pause_is_not_lost() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(&dir.path().join("state"), "", "");
    let actioner = start(&config);
    let recorder = &actioner.recorder;
    let (paused, resumed) = tokio::join!(recorder.set_paused(true), recorder.set_paused(false));
    assert_eq!((paused, resumed), (Ok(()), Ok(())));
    assert!(
        !recorder.snapshot().paused,
        "resume answered 200 after pause, yet the actioner is paused"
    );
}

/// A webhook decided in the same batch as a pause, after it (the journal says "paused" at
/// seq N and "planned" at seq N+1): it plans and acts although the pause was answered first.
#[tokio::test(flavor = "current_thread")]
async fn nothing_is_planned_after_a_pause_in_the_same_batch() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(&dir.path().join("state"), "", "");
    let actioner = start(&config);
    let recorder = &actioner.recorder;
    let payload =
        parse_payload(one_alert("NasNeeded", "00000000000000b1", "firing").as_bytes()).unwrap();
    let (paused, receipt) = tokio::join!(recorder.set_paused(true), recorder.webhook(payload));
    assert_eq!(paused, Ok(()));
    let journal = read_journal(&dir.path().join("state"));
    let events: Vec<Event> = journal.iter().map(|e| e.event).collect();
    let paused_at = events.iter().position(|e| *e == Event::Paused).unwrap();
    let planned_after = journal[paused_at..]
        .iter()
        .any(|e| e.event == Event::Planned);
    assert!(
        !planned_after,
        "planned after the pause (receipt {receipt:?}): {events:?}"
    );
}

/// A failover runs; the game ends, and the failback waits in the backend lane; a person
/// pauses (200). When the failover ends, the failback still starts: an automatic action
/// begins while paused. The lane never asks whether the run may still go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failback_queued_behind_a_failover_does_not_start_after_a_pause() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(&dir.path().join("state"), GAMING_RULES, DOCKER_FAILOVER);
    let mut built = build_actions(&config).unwrap();
    let runs = stand_ins(
        &mut built,
        &[
            (ActionKind::Failover, Duration::from_millis(1500)),
            (ActionKind::Failback, Duration::from_millis(10)),
        ],
    );
    let actioner = start_with(&config, built);
    let router = &actioner.router;
    let firing = one_alert("Gaming", "00000000000000c1", "firing");
    post_ok(router, "/api/v1/alerts", &firing).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let resolved = one_alert("Gaming", "00000000000000c1", "resolved");
    post_ok(router, "/api/v1/alerts", &resolved).await;
    post_ok(router, "/api/v1/pause", "").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let journal = read_journal(&dir.path().join("state"));
    let paused_at = journal
        .iter()
        .position(|e| e.event == Event::Paused)
        .unwrap();
    let started_after: Vec<_> = journal[paused_at..]
        .iter()
        .filter(|e| e.event == Event::Started)
        .map(|e| e.key.clone())
        .collect();
    assert!(
        started_after.is_empty(),
        "rule runs started after the pause was answered: {started_after:?}; ran {:?}",
        runs.kinds()
    );
}

/// Fails the `n`-th file-system step of kind `op` from now (1 = the next one).
#[derive(Debug)]
struct FailNth {
    op: Op,
    countdown: AtomicUsize,
    errno: i32,
    /// Also fail every truncate while set (a disk that gives EIO on both).
    truncate_fails: AtomicBool,
}

impl FaultPlan for FailNth {
    fn before(&self, op: Op, _file: &Path) -> io::Result<()> {
        if op == Op::Truncate && self.truncate_fails.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(5));
        }
        if op == self.op {
            let left = self.countdown.load(Ordering::SeqCst);
            if left > 0 {
                self.countdown.store(left - 1, Ordering::SeqCst);
                if left == 1 {
                    return Err(io::Error::from_raw_os_error(self.errno));
                }
            }
        }
        Ok(())
    }
}

/// The actioner as `Actioner::start_with` builds it, with faults in its journal.
fn start_with_faults(config: &Config, actions: Actions, faults: Arc<dyn FaultPlan>) -> Recorder {
    let mut ledger = Ledger::new(false);
    let (journal, _) = Journal::open_with(
        &config.state_dir,
        JournalLimits::default(),
        Some(faults),
        |e| ledger.apply(e),
    )
    .unwrap();
    let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(Snapshot::default()));
    let metrics = Metrics::new(snapshot_rx);
    let (jobs_tx, jobs_rx) = mpsc::unbounded_channel();
    let policy = Policy::new(
        RuleSet::new(config).unwrap(),
        RepairBudget {
            max_attempts: 3,
            window: Duration::from_secs(3600),
        },
    );
    let recorder = Recorder::start(
        journal,
        ledger,
        policy,
        jobs_tx,
        metrics.clone(),
        snapshot_tx,
        1024,
    )
    .unwrap();
    aistack_actioner::executor::spawn(actions, recorder.clone(), metrics, jobs_rx);
    recorder
}

/// The webhook is journaled (200), then the one write of the run's "started" entry fails
/// (EIO, ENOSPC: transient). The executor gives the run up ("not started"), journals nothing
/// more, and the firing's once-only key is spent: Alertmanager's re-send is a "duplicate".
/// The action never runs, and nothing in the journal says it did not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_fault_on_started_does_not_lose_the_action_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        &dir.path().join("state"),
        "  - {name: failover, match: {alertname: Gaming}, on: firing, action: failover}",
        "  failover:\n    docker: {primary: vllm, fallback: ollama}",
    );
    let mut built = build_actions(&config).unwrap();
    let runs = stand_ins(&mut built, &[(ActionKind::Failover, Duration::ZERO)]);
    // Write 1: the webhook's batch. Write 2: the run's "started".
    let faults = Arc::new(FailNth {
        op: Op::Write,
        countdown: AtomicUsize::new(2),
        errno: 28,
        truncate_fails: AtomicBool::new(false),
    });
    let recorder = start_with_faults(&config, built.actions, faults);
    let body = one_alert("Gaming", "00000000000000d1", "firing");
    let first = recorder
        .webhook(parse_payload(body.as_bytes()).unwrap())
        .await;
    assert_eq!(first.map(|r| r.planned), Ok(1));
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The disk has room again; Alertmanager re-sends (group_interval / repeat_interval).
    let again = recorder
        .webhook(parse_payload(body.as_bytes()).unwrap())
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let journal = read_journal(&config.state_dir);
    let summary: Vec<(Event, Option<Reason>)> =
        journal.iter().map(|e| (e.event, e.reason)).collect();
    assert_eq!(
        runs.all().len(),
        1,
        "the failover never ran; the re-send got {again:?}; journal {summary:?}"
    );
}

/// A pause whose fsync fails (EIO) is answered 500, and the live actioner is not paused. The
/// line landed and the disk refuses the truncate too, so it stays; after a restart it counts,
/// and the actioner comes back paused: a decision that was reported as failed takes effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_answered_500_is_not_in_force_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(&dir.path().join("state"), "", "");
    // Sync 1: the journal's open. Sync 2: the pause's batch.
    let faults = Arc::new(FailNth {
        op: Op::Sync,
        countdown: AtomicUsize::new(2),
        errno: 5,
        truncate_fails: AtomicBool::new(true),
    });
    let recorder = start_with_faults(
        &config,
        build_actions(&config).unwrap().actions,
        faults.clone(),
    );
    assert!(recorder.set_paused(true).await.is_err(), "answered 500");
    assert!(!recorder.snapshot().paused);
    // While the failed batch cannot be cut off, nothing is written after it.
    let body = one_alert("Other", "00000000000000e1", "firing");
    assert!(
        recorder
            .webhook(parse_payload(body.as_bytes()).unwrap())
            .await
            .is_err()
    );
    // The disk recovers; the next batch (any webhook) goes through.
    faults.truncate_fails.store(false, Ordering::SeqCst);
    recorder
        .webhook(parse_payload(body.as_bytes()).unwrap())
        .await
        .unwrap();
    assert!(!recorder.snapshot().paused);
    drop(recorder);
    let mut ledger = Ledger::new(false);
    Journal::open(&config.state_dir, JournalLimits::default(), |e| {
        ledger.apply(e)
    })
    .unwrap();
    assert!(
        !ledger.paused(),
        "after a restart the actioner is paused by a request that was answered 500"
    );
}

/// While paused, a resolved Gaming alert's failback is skipped and deferred to the resume. A
/// person then asks for a dry run of failover (allowed while paused: it does nothing). The dry
/// run's "planned" entry counts as a backend decision and the deferred failback is dropped:
/// at the resume nothing fails back, and inference stays on the fallback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_while_paused_does_not_cancel_the_deferred_failback() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    failed_over_before(&state);
    let config = config(&state, GAMING_DRY_RULES, DOCKER_FAILOVER);
    let actioner = start(&config);
    let router = &actioner.router;
    post_ok(router, "/api/v1/pause", "").await;
    let resolved = one_alert("Gaming", "00000000000000f1", "resolved");
    post_ok(router, "/api/v1/alerts", &resolved).await;
    post_ok(router, "/api/v1/actions/failover", r#"{"dry_run":true}"#).await;
    post_ok(router, "/api/v1/resume", "").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let journal = read_journal(&state);
    let deferred = journal.iter().any(|e| {
        e.event == Event::Planned
            && e.action == Some(ActionKind::Failback)
            && e.detail
                .as_deref()
                .is_some_and(|d| d.starts_with("deferred"))
    });
    let summary: Vec<String> = journal
        .iter()
        .map(|e| format!("{:?} {:?} {:?} {:?}", e.event, e.action, e.reason, e.detail))
        .collect();
    assert!(deferred, "no deferred failback at the resume: {summary:#?}");
}

/// A failover is running (Ollama coming up) when a person pauses; the game ends while paused,
/// so the failback is skipped and deferred; the person resumes before the failover has ended.
/// At the resume the ledger still says "primary" (the failover has not succeeded yet), so the
/// deferred failback is dropped — and the resume clears it for good. The failover then ends:
/// inference stays on the fallback with the GPU free, and nothing will ever fail back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_during_a_failover_keeps_the_deferred_failback() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(&dir.path().join("state"), GAMING_RULES, DOCKER_FAILOVER);
    let mut built = build_actions(&config).unwrap();
    let runs = stand_ins(
        &mut built,
        &[
            (ActionKind::Failover, Duration::from_millis(1500)),
            (ActionKind::Failback, Duration::from_millis(10)),
        ],
    );
    let actioner = start_with(&config, built);
    let router = &actioner.router;
    let firing = one_alert("Gaming", "00000000000000c2", "firing");
    post_ok(router, "/api/v1/alerts", &firing).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    post_ok(router, "/api/v1/pause", "").await;
    let resolved = one_alert("Gaming", "00000000000000c2", "resolved");
    post_ok(router, "/api/v1/alerts", &resolved).await;
    post_ok(router, "/api/v1/resume", "").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_, state) = api(router, "GET", "/api/v1/state", "").await;
    assert_eq!(
        runs.kinds(),
        [ActionKind::Failover, ActionKind::Failback],
        "the game ended, yet inference stays on the {}",
        state["inference_backend"]
    );
}
