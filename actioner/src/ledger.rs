//! The ledger: what the journal says, folded. It is pure — fed journal entries (every one read
//! back at start, then each batch the recorder commits), it changes only in [`Ledger::apply`]
//! and reads only typed fields: the event, the action, the `reason` tag. Which firings ran,
//! which runs are open, pause, the backend, recent runs per target (cooldowns, repair
//! budgets), the failback a pause held back, the last suspend.
//!
//! At a rotation it writes itself out as a checkpoint ([`Ledger::checkpoint`]); reading a
//! complete checkpoint back restores exactly that state, so the files before it may go.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::SystemTime;

use crate::alert::AlertStatus;
use crate::journal::{
    ActionRuns, Checkpoint, CheckpointState, Event, JournalEntry, KeyHash, NodeBackend, RuleRun,
};
use crate::vocab::{ActionKind, AwakeStamp, Backend, Reason, RunKey, Timestamp};

/// Once-only keys remembered; the oldest are forgotten first (a checkpoint carries them all).
pub const DEDUPE_CAPACITY: usize = 200_000;
/// Journal entries kept for `GET /api/v1/actions`.
pub const RECENT_CAPACITY: usize = 1000;
/// Runs kept per action and target, for repair budgets.
const RUNS_KEPT: usize = 32;
/// Rule/target and action/target pairs remembered: far more than any config has.
const PAIRS_KEPT: usize = 4096;
/// Digests per checkpoint line, and open runs per line: lines of a few hundred KiB at most.
const DIGESTS_PER_PART: usize = 8192;
const OPEN_RUNS_PER_PART: usize = 64;

/// The ledger as `/metrics`, `/api/v1/state`, `/api/v1/actions` and the executor read it,
/// published by the recorder after each batch.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Automatic actions paused.
    pub paused: bool,
    /// The backend serving.
    pub backend: Backend,
    /// Since when.
    pub backend_since: Option<Timestamp>,
    /// Where each GPU node has its own pair: each node's backend, and since when.
    pub node_backends: Vec<(String, Backend, Option<Timestamp>)>,
    /// `rule/target`, and when its cooldown ends.
    pub cooldowns: Vec<(String, SystemTime)>,
    /// Repair targets left to a person, and when their budget is back (`None`: it is).
    pub exhausted: Vec<(String, Option<SystemTime>)>,
    /// The newest journal entries, oldest first.
    pub recent: Arc<[Arc<JournalEntry>]>,
    /// Where the host stood when a suspend last started.
    pub last_suspend: Option<AwakeStamp>,
    /// Why the journal cannot be written, while it cannot.
    pub journal_failure: Option<String>,
}

/// A bounded set of digests that forgets the least recently seen first. A digest seen again
/// (a firing re-sent while it still fires) moves to the back, at most once per half a window,
/// so a firing that keeps firing is never forgotten and a flood of repeats cannot crowd out
/// the rest.
#[derive(Debug, Clone, Default)]
struct DigestWindow {
    /// Each digest remembered, and the position of its latest place in `order`.
    live: HashMap<KeyHash, u64>,
    /// Places, oldest first; one that is not its digest's latest is stale.
    order: VecDeque<(KeyHash, u64)>,
    next: u64,
}

impl DigestWindow {
    fn push(&mut self, hash: KeyHash) {
        self.order.push_back((hash, self.next));
        self.live.insert(hash, self.next);
        self.next += 1;
        while self.live.len() > DEDUPE_CAPACITY || self.order.len() > 2 * DEDUPE_CAPACITY {
            let Some((old, at)) = self.order.pop_front() else {
                break;
            };
            if self.live.get(&old) == Some(&at) {
                self.live.remove(&old);
            }
        }
    }

    fn insert(&mut self, hash: KeyHash) {
        if !self.live.contains_key(&hash) {
            self.push(hash);
        }
    }

    /// `hash` was seen again: it moves to the back unless it moved there lately.
    fn refresh(&mut self, hash: KeyHash) {
        if let Some(at) = self.live.get(&hash)
            && self.next - at > (DEDUPE_CAPACITY / 2) as u64
        {
            self.push(hash);
        }
    }

    fn contains(&self, hash: KeyHash) -> bool {
        self.live.contains_key(&hash)
    }

    fn len(&self) -> usize {
        self.live.len()
    }

    /// The digests remembered, least recently seen first.
    fn in_order(&self) -> impl Iterator<Item = KeyHash> + '_ {
        self.order
            .iter()
            .filter(|(hash, at)| self.live.get(hash) == Some(at))
            .map(|(hash, _)| *hash)
    }
}

impl PartialEq for DigestWindow {
    fn eq(&self, other: &Self) -> bool {
        self.live.len() == other.live.len() && self.in_order().eq(other.in_order())
    }
}

/// A run planned or started and not ended.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenRun {
    /// Its latest entry (`planned` or `started`).
    pub entry: JournalEntry,
    /// Whether it began acting.
    pub started: bool,
}

/// What the journal says, folded.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Ledger {
    /// Once-only keys that ran.
    done: DigestWindow,
    /// Firings (`<fingerprint>@<startsAt>`) that resolved; kept only when buttons are offered.
    resolved: Option<DigestWindow>,
    /// The last run per rule and target ("" for actions without targets).
    rule_runs: HashMap<(String, String), Timestamp>,
    /// Recent runs per action and target, oldest first.
    action_runs: HashMap<(ActionKind, String), VecDeque<Timestamp>>,
    paused: bool,
    /// The backend of each pair ("" for the one pair, else the GPU node's name), and since
    /// when; a pair never moved is on its primary.
    backends: BTreeMap<String, (Backend, Option<Timestamp>)>,
    open: BTreeMap<RunKey, OpenRun>,
    /// Repair targets whose last word was "exhausted".
    exhausted: BTreeSet<String>,
    /// Per pair: a failback a rule missed while paused, with no backend decision since.
    deferred_failbacks: BTreeMap<String, JournalEntry>,
    /// Where the host stood when the last suspend that asked logind began.
    last_suspend: Option<AwakeStamp>,
    recent: VecDeque<Arc<JournalEntry>>,
    /// The parts of a checkpoint being read back.
    incoming: Vec<Checkpoint>,
}

impl Ledger {
    /// An empty ledger; `track_resolved` keeps the resolved firings buttons need.
    pub fn new(track_resolved: bool) -> Self {
        Self {
            resolved: track_resolved.then(DigestWindow::default),
            ..Self::default()
        }
    }

    /// Folds one entry in.
    pub fn apply(&mut self, entry: JournalEntry) {
        match entry.event {
            Event::Checkpoint => {
                if let Some(part) = &entry.checkpoint {
                    self.take_checkpoint_part(part);
                }
                return;
            }
            Event::Received => self.received(&entry),
            Event::Planned => self.planned(&entry),
            Event::Started => self.started(&entry),
            Event::Succeeded | Event::Failed => self.ended(&entry),
            Event::Skipped => self.skipped(&entry),
            Event::Paused => self.paused = true,
            Event::Resumed => {
                self.paused = false;
                // The resume had its chance to plan them (the recorder decides before it
                // commits).
                self.deferred_failbacks.clear();
            }
        }
        self.recent.push_back(Arc::new(entry));
        if self.recent.len() > RECENT_CAPACITY {
            self.recent.pop_front();
        }
    }

    fn received(&mut self, entry: &JournalEntry) {
        if let (Some(resolved), Some(alert)) = (&mut self.resolved, &entry.alert)
            && alert.status == AlertStatus::Resolved
        {
            resolved.insert(KeyHash::of(&alert.firing()));
        }
    }

    fn planned(&mut self, entry: &JournalEntry) {
        let Some(key) = &entry.key else { return };
        // A backend decision made since the pause replaces the one it held back (a dry run
        // decides nothing).
        if entry.action.is_some_and(ActionKind::moves_backend) && !entry.dry_run {
            self.deferred_failbacks.remove(pair_of(entry));
        }
        if key.is_once_only() {
            self.done.insert(KeyHash::of(key.as_str()));
        }
        self.open.insert(
            key.clone(),
            OpenRun {
                entry: entry.clone(),
                started: false,
            },
        );
        if entry.dry_run {
            return;
        }
        let Some(action) = entry.action else { return };
        // A relayed wake to a raw MAC has no allowlisted target: no state is kept for it.
        if action.takes_target() && entry.target.is_none() {
            return;
        }
        let target = entry.target.clone().unwrap_or_default();
        if let Some(rule) = &entry.rule {
            bounded_insert(
                &mut self.rule_runs,
                (rule.clone(), target.clone()),
                entry.ts,
            );
        }
        let runs = self.action_runs.entry((action, target)).or_default();
        runs.push_back(entry.ts);
        if runs.len() > RUNS_KEPT {
            runs.pop_front();
        }
        if self.action_runs.len() > PAIRS_KEPT {
            let oldest = self
                .action_runs
                .iter()
                .min_by_key(|(_, at)| at.back().copied())
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                self.action_runs.remove(&oldest);
            }
        }
    }

    fn started(&mut self, entry: &JournalEntry) {
        let Some(key) = &entry.key else { return };
        self.open.insert(
            key.clone(),
            OpenRun {
                entry: entry.clone(),
                started: true,
            },
        );
    }

    fn ended(&mut self, entry: &JournalEntry) {
        let run = entry.key.as_ref().and_then(|key| self.open.remove(key));
        // A suspend that asked logind (or may have: the actioner stopped during it) starts
        // the resume grace from where the host stood when it began.
        let may_have_slept =
            entry.event == Event::Succeeded || entry.reason == Some(Reason::Interrupted);
        if entry.action == Some(ActionKind::Suspend)
            && may_have_slept
            && let Some(awake) = run.filter(|r| r.started).and_then(|r| r.entry.awake)
        {
            self.last_suspend = Some(awake);
        }
        if entry.event != Event::Succeeded {
            return;
        }
        match entry.action {
            Some(ActionKind::Repair) => {
                if let Some(target) = &entry.target {
                    self.exhausted.remove(target);
                }
            }
            Some(ActionKind::Failover) => self.set_backend(entry, Backend::Fallback),
            Some(ActionKind::Failback) => self.set_backend(entry, Backend::Primary),
            _ => {}
        }
    }

    fn set_backend(&mut self, entry: &JournalEntry, backend: Backend) {
        self.backends
            .insert(pair_of(entry).to_owned(), (backend, Some(entry.ts)));
    }

    fn skipped(&mut self, entry: &JournalEntry) {
        let reason = entry.reason;
        // A rule's backend decision missed while paused: the latest one counts (a failover
        // skipped after it means the GPU is busy again).
        if reason == Some(Reason::Paused) && entry.alert.is_some() {
            // A dry-run failback does not replace a real one; a failover, dry run or not, says
            // the GPU is busy again.
            let pair = pair_of(entry).to_owned();
            let real_held = self
                .deferred_failbacks
                .get(&pair)
                .is_some_and(|e| !e.dry_run);
            match entry.action {
                Some(ActionKind::Failback) if !(entry.dry_run && real_held) => {
                    self.deferred_failbacks.insert(pair, entry.clone());
                }
                Some(ActionKind::Failover) => {
                    self.deferred_failbacks.remove(&pair);
                }
                _ => {}
            }
        }
        // A firing re-sent while it still fires is remembered the longer.
        if reason == Some(Reason::Duplicate)
            && let Some(key) = entry.key.as_ref().filter(|k| k.is_once_only())
        {
            self.done.refresh(KeyHash::of(key.as_str()));
        }
        // A repeat is refused under the key of the run it repeats, and that run goes on.
        if !reason.is_some_and(Reason::is_repeat)
            && let Some(key) = &entry.key
        {
            self.open.remove(key);
        }
        if entry.action == Some(ActionKind::Repair)
            && let Some(target) = &entry.target
        {
            match reason {
                Some(Reason::Exhausted) => {
                    self.exhausted.insert(target.clone());
                }
                Some(Reason::ConditionGone) => {
                    self.exhausted.remove(target);
                }
                _ => {}
            }
        }
    }

    fn take_checkpoint_part(&mut self, part: &Checkpoint) {
        let follows = self
            .incoming
            .last()
            .is_some_and(|last| last.part + 1 == part.part && last.parts == part.parts);
        if part.part == 1 {
            self.incoming = vec![part.clone()];
        } else if follows {
            self.incoming.push(part.clone());
        } else {
            // A part out of place: that checkpoint is incomplete and does not count.
            self.incoming.clear();
            return;
        }
        if self.incoming.len() == part.parts as usize {
            let parts = std::mem::take(&mut self.incoming);
            self.restore(&parts);
        }
    }

    /// Becomes the state a complete checkpoint describes (recent entries are kept).
    fn restore(&mut self, parts: &[Checkpoint]) {
        let state = parts
            .first()
            .and_then(|p| p.state.as_deref())
            .cloned()
            .unwrap_or_default();
        let mut done = DigestWindow::default();
        let mut resolved = self.resolved.as_ref().map(|_| DigestWindow::default());
        let mut open = BTreeMap::new();
        for part in parts {
            part.done.iter().for_each(|h| done.insert(*h));
            if let Some(resolved) = &mut resolved {
                part.resolved.iter().for_each(|h| resolved.insert(*h));
            }
            for entry in &part.open {
                if let Some(key) = &entry.key {
                    let started = entry.event == Event::Started;
                    open.insert(
                        key.clone(),
                        OpenRun {
                            entry: entry.clone(),
                            started,
                        },
                    );
                }
            }
        }
        self.done = done;
        self.resolved = resolved;
        self.open = open;
        self.paused = state.paused;
        self.backends = std::iter::once((String::new(), (state.backend, state.backend_since)))
            .chain(
                state
                    .node_backends
                    .into_iter()
                    .map(|n| (n.node, (n.backend, n.since))),
            )
            // A pair never moved is on its primary with or without an entry.
            .filter(|(_, state)| *state != (Backend::Primary, None))
            .collect();
        self.rule_runs = state
            .rule_runs
            .into_iter()
            .map(|r| ((r.rule, r.target), r.at))
            .collect();
        self.action_runs = state
            .action_runs
            .into_iter()
            .map(|r| ((r.action, r.target), r.at.into_iter().collect()))
            .collect();
        self.exhausted = state.exhausted.into_iter().collect();
        self.deferred_failbacks = state
            .deferred_failback
            .into_iter()
            .chain(state.deferred_failbacks)
            .map(|entry| (pair_of(&entry).to_owned(), entry))
            .collect();
        self.last_suspend = state.last_suspend;
    }

    /// The ledger as checkpoint entries (unnumbered), for the first lines of a new file.
    pub fn checkpoint(&self) -> Vec<JournalEntry> {
        let mut rule_runs: Vec<RuleRun> = self
            .rule_runs
            .iter()
            .map(|((rule, target), at)| RuleRun {
                rule: rule.clone(),
                target: target.clone(),
                at: *at,
            })
            .collect();
        rule_runs.sort_by(|a, b| (&a.rule, &a.target).cmp(&(&b.rule, &b.target)));
        let mut action_runs: Vec<ActionRuns> = self
            .action_runs
            .iter()
            .map(|((action, target), at)| ActionRuns {
                action: *action,
                target: target.clone(),
                at: at.iter().copied().collect(),
            })
            .collect();
        action_runs.sort_by(|a, b| (a.action, &a.target).cmp(&(b.action, &b.target)));
        let (backend, backend_since) = self.backend("");
        let state = CheckpointState {
            paused: self.paused,
            backend,
            backend_since,
            node_backends: self
                .backends
                .iter()
                .filter(|(node, _)| !node.is_empty())
                .map(|(node, (backend, since))| NodeBackend {
                    node: node.clone(),
                    backend: *backend,
                    since: *since,
                })
                .collect(),
            rule_runs,
            action_runs,
            exhausted: self.exhausted.iter().cloned().collect(),
            deferred_failback: self.deferred_failbacks.get("").cloned(),
            deferred_failbacks: self
                .deferred_failbacks
                .iter()
                .filter(|(pair, _)| !pair.is_empty())
                .map(|(_, entry)| entry.clone())
                .collect(),
            last_suspend: self.last_suspend.clone(),
        };
        let mut parts = vec![Checkpoint {
            state: Some(Box::new(state)),
            ..Checkpoint::default()
        }];
        let done: Vec<KeyHash> = self.done.in_order().collect();
        for chunk in done.chunks(DIGESTS_PER_PART) {
            parts.push(Checkpoint {
                done: chunk.to_vec(),
                ..Checkpoint::default()
            });
        }
        if let Some(resolved) = &self.resolved {
            let resolved: Vec<KeyHash> = resolved.in_order().collect();
            for chunk in resolved.chunks(DIGESTS_PER_PART) {
                parts.push(Checkpoint {
                    resolved: chunk.to_vec(),
                    ..Checkpoint::default()
                });
            }
        }
        let open: Vec<JournalEntry> = self.open.values().map(|r| r.entry.clone()).collect();
        for chunk in open.chunks(OPEN_RUNS_PER_PART) {
            parts.push(Checkpoint {
                open: chunk.to_vec(),
                ..Checkpoint::default()
            });
        }
        let total = u32::try_from(parts.len()).unwrap_or(u32::MAX);
        parts
            .into_iter()
            .zip(1..)
            .map(|(part, n)| JournalEntry {
                checkpoint: Some(Box::new(Checkpoint {
                    part: n,
                    parts: total,
                    ..part
                })),
                ..JournalEntry::new(Event::Checkpoint)
            })
            .collect()
    }

    /// Whether the once-only run `key` ran (or runs).
    pub fn ran(&self, key: &RunKey) -> bool {
        self.done.contains(KeyHash::of(key.as_str()))
    }

    /// Whether the firing `<fingerprint>@<startsAt>` has resolved (with buttons only).
    pub fn has_resolved(&self, firing: &str) -> bool {
        self.resolved
            .as_ref()
            .is_some_and(|r| r.contains(KeyHash::of(firing)))
    }

    /// Whether resolved firings are kept.
    pub fn tracks_resolved(&self) -> bool {
        self.resolved.is_some()
    }

    /// When `rule` last ran on `target`.
    pub fn rule_last_run(&self, rule: &str, target: &str) -> Option<Timestamp> {
        self.rule_runs
            .get(&(rule.to_owned(), target.to_owned()))
            .copied()
    }

    /// Every rule/target pair with its last run.
    pub fn rule_runs(&self) -> impl Iterator<Item = (&str, &str, Timestamp)> {
        self.rule_runs
            .iter()
            .map(|((rule, target), at)| (rule.as_str(), target.as_str(), *at))
    }

    /// Recent runs of `action` on `target`, oldest first.
    pub fn action_runs(
        &self,
        action: ActionKind,
        target: &str,
    ) -> impl Iterator<Item = SystemTime> {
        self.action_runs
            .get(&(action, target.to_owned()))
            .into_iter()
            .flatten()
            .map(|at| at.0)
    }

    /// Automatic actions paused.
    pub fn paused(&self) -> bool {
        self.paused
    }

    /// The pairs on their fallback ("" for the one pair, else a GPU node's).
    pub fn on_fallback(&self) -> impl Iterator<Item = &str> {
        self.backends
            .iter()
            .filter(|(_, (backend, _))| *backend == Backend::Fallback)
            .map(|(pair, _)| pair.as_str())
    }

    /// The backend serving `pair` ("" for the one pair, else a GPU node's), and since when.
    pub fn backend(&self, pair: &str) -> (Backend, Option<Timestamp>) {
        self.backends.get(pair).copied().unwrap_or_default()
    }

    /// Repair targets left to a person.
    pub fn exhausted(&self) -> impl Iterator<Item = &str> {
        self.exhausted.iter().map(String::as_str)
    }

    /// The failbacks rules missed while paused, one per pair at most, where no backend
    /// decision came since.
    pub fn deferred_failbacks(&self) -> impl Iterator<Item = &JournalEntry> {
        self.deferred_failbacks.values()
    }

    /// Runs planned or started and not ended.
    pub fn open_runs(&self) -> impl Iterator<Item = &OpenRun> {
        self.open.values()
    }

    /// Whether a failover or failback (not a dry run) of `pair` is planned or running.
    pub fn backend_moving(&self, pair: &str) -> bool {
        self.open.values().any(|r| {
            r.entry.action.is_some_and(ActionKind::moves_backend)
                && !r.entry.dry_run
                && pair_of(&r.entry) == pair
        })
    }

    /// Where the host stood when a suspend last started.
    pub fn last_suspend(&self) -> Option<&AwakeStamp> {
        self.last_suspend.as_ref()
    }

    /// The newest entries, oldest first.
    pub fn recent(&self) -> &VecDeque<Arc<JournalEntry>> {
        &self.recent
    }

    /// Once-only keys remembered.
    pub fn remembered(&self) -> usize {
        self.done.len()
    }
}

/// The pair a failover or failback entry is about: its target (a GPU node), "" for the one.
fn pair_of(entry: &JournalEntry) -> &str {
    entry.target.as_deref().unwrap_or_default()
}

fn bounded_insert(
    map: &mut HashMap<(String, String), Timestamp>,
    key: (String, String),
    at: Timestamp,
) {
    map.insert(key, at);
    if map.len() > PAIRS_KEPT
        && let Some(oldest) = map
            .iter()
            .min_by_key(|(_, at)| **at)
            .map(|(k, _)| k.clone())
    {
        map.remove(&oldest);
    }
}

#[cfg(test)]
mod tests;
