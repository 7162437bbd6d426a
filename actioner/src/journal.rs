//! The journal: every decision the actioner makes, as JSON lines in `<state_dir>`, synced to
//! disk (fsync) before the webhook is answered or an action starts. It is read back at start
//! (streamed into the ledger, one line at a time), so a restart knows which firings already
//! ran, what was interrupted, whether the actioner is paused and which backend serves.
//!
//! Entries are typed: a skipped, refused or failed entry carries a `reason` tag and its data
//! (`left_s`, `attempts`, `window_s`) as fields; `detail` is for people and is never read back.
//! Entries written by release 0.1.0, which said why only in `detail`, get their tag from that
//! release's frozen wording when read ([`upgrade_0_1_0`]).
//!
//! Files: `journal.jsonl` is the one being written. Past `max_bytes` it is archived as
//! `journal-<first seq>.jsonl` and a new `journal.jsonl` begins with a checkpoint of the
//! ledger, so that dropping the oldest archives (past `keep`) never loses what a restart needs:
//! the once-only keys of firings still being re-sent, open runs, pause, backend, cooldowns.
//! Rotation never leaves the journal without its current file: the new file is written and
//! synced first, then the current one is hard-linked to its archive name and the new one
//! renamed over it. Any failure on the way leaves the current file in place and is retried
//! at the next batch. 0.1.0's `journal.<n>.jsonl` files are read first and aged out like
//! archives.
//!
//! A write that fails (`ENOSPC`, `EIO`, `EMFILE`) answers an error, so nothing acts and
//! Alertmanager retries; the file is cut back to its last synced length and reopened before
//! the next batch, and the failure is reported until a write succeeds. Lines that cannot be
//! read back — torn by a crash, invalid UTF-8, longer than [`MAX_LINE_BYTES`], or repeating an
//! earlier sequence number — are skipped and counted, never a reason not to start.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::alert::{Alert, AlertStatus};
use crate::fence::Fence;
use crate::vocab::{
    ActionKind, AwakeStamp, Backend, Plan, Reason, RunKey, Skip, Timestamp, cut_bytes,
};

/// Longest line read back; longer ones are skipped (no entry is written that long).
pub const MAX_LINE_BYTES: usize = 1 << 20;
/// The largest `seq` taken for real: beyond it a line is corruption (a billion entries a
/// second would take a century to get there).
pub const MAX_SEQ: u64 = 1 << 62;
/// Longest `detail` written; longer text is cut.
pub const MAX_DETAIL_BYTES: usize = 2048;
/// Longest alert name written (it is a label value, and only for people).
pub const MAX_ALERT_NAME_BYTES: usize = 256;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// An alert arrived.
    Received,
    /// A rule (or a person) will act.
    Planned,
    /// It will not act (`reason` says why).
    Skipped,
    /// An action began.
    Started,
    /// It worked.
    Succeeded,
    /// It did not (`reason` says how).
    Failed,
    /// Automatic actions were paused.
    Paused,
    /// ... and resumed.
    Resumed,
    /// The ledger as it stood at a rotation, in parts.
    Checkpoint,
}

/// Which alert an entry is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertRef {
    /// `alertname` (cut to [`MAX_ALERT_NAME_BYTES`]).
    pub name: String,
    /// Alertmanager's fingerprint.
    pub fingerprint: String,
    /// `firing` or `resolved`.
    pub status: AlertStatus,
    /// When it started firing, as Alertmanager wrote it.
    pub starts_at: String,
    /// The node it is about (its `host` label, else `instance`'s host), cut to
    /// [`MAX_ALERT_NAME_BYTES`]: a failback deferred while paused re-checks that node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

impl AlertRef {
    /// `<fingerprint>@<startsAt>`: one firing of one alert.
    pub fn firing(&self) -> String {
        format!("{}@{}", self.fingerprint, self.starts_at)
    }
}

impl From<&Alert> for AlertRef {
    fn from(alert: &Alert) -> Self {
        Self {
            name: cut_bytes(alert.name(), MAX_ALERT_NAME_BYTES).to_owned(),
            fingerprint: alert.fingerprint.clone(),
            status: alert.status,
            starts_at: alert.starts_at.clone(),
            host: alert
                .host()
                .map(|h| cut_bytes(&h, MAX_ALERT_NAME_BYTES).to_owned()),
        }
    }
}

/// A 64-bit digest of a run key or a firing (the first 8 bytes of its SHA-256): what the
/// ledger remembers instead of the key, and what a checkpoint carries. Stable across builds
/// and releases, unlike `std`'s hasher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyHash(pub u64);

impl KeyHash {
    /// The digest of `text`.
    pub fn of(text: &str) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest.as_ref()[..8]);
        Self(u64::from_be_bytes(first))
    }
}

impl Serialize for KeyHash {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&format_args!("{:016x}", self.0))
    }
}

impl<'de> Deserialize<'de> for KeyHash {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        u64::from_str_radix(&text, 16)
            .map(Self)
            .map_err(serde::de::Error::custom)
    }
}

/// One part of a checkpoint: the ledger at a rotation. Part 1 carries the state, the others
/// the once-only and resolved digests and the open runs, in chunks that keep lines short.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// This part, from 1.
    pub part: u32,
    /// How many parts make the whole; the checkpoint counts only once all are read.
    pub parts: u32,
    /// The state (part 1 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<Box<CheckpointState>>,
    /// Once-only keys that ran, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub done: Vec<KeyHash>,
    /// Firings that resolved, oldest first (kept when buttons are offered).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resolved: Vec<KeyHash>,
    /// Runs planned or started and not ended: their latest entry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub open: Vec<JournalEntry>,
}

/// The ledger's scalar state in a checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Automatic actions paused.
    pub paused: bool,
    /// The backend serving.
    pub backend: Backend,
    /// Since when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_since: Option<Timestamp>,
    /// Where each GPU node has its own pair: the backend of each node that moved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_backends: Vec<NodeBackend>,
    /// The last run per rule and target.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rule_runs: Vec<RuleRun>,
    /// Recent runs per action and target.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub action_runs: Vec<ActionRuns>,
    /// Repair targets left to a person.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exhausted: Vec<String>,
    /// A failback a rule missed while paused (the one pair's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deferred_failback: Option<JournalEntry>,
    /// Failbacks rules missed while paused, of per-node pairs (each entry names its node).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deferred_failbacks: Vec<JournalEntry>,
    /// Where the host stood when this actioner last asked logind to sleep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_suspend: Option<AwakeStamp>,
}

/// The backend of a GPU node's own vLLM/Ollama pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeBackend {
    /// The node.
    pub node: String,
    /// Its backend.
    pub backend: Backend,
    /// Since when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Timestamp>,
}

/// When a rule last ran on a target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleRun {
    /// The rule.
    pub rule: String,
    /// The target ("" for actions without one).
    pub target: String,
    /// When it was planned.
    pub at: Timestamp,
}

/// When an action recently ran on a target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionRuns {
    /// The action.
    pub action: ActionKind,
    /// The target ("" for actions without one).
    pub target: String,
    /// When each was planned, oldest first.
    pub at: Vec<Timestamp>,
}

/// One line of the journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// Position in the journal, increasing across restarts and rotations.
    pub seq: u64,
    /// When it was written.
    pub ts: Timestamp,
    /// What happened.
    pub event: Event,
    /// The run it belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<RunKey>,
    /// The rule, or `manual:<source>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<ActionKind>,
    /// The allowlisted target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The alert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert: Option<AlertRef>,
    /// A dry run.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// A manual failback that skipped its GPU check (`"force": true`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
    /// Why it was skipped, refused or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// Seconds left of a cooldown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub left_s: Option<u64>,
    /// Repairs counted in the window, for `exhausted`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// The repair window in seconds, for `exhausted`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_s: Option<u64>,
    /// The host's boot and awake time when a run started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub awake: Option<AwakeStamp>,
    /// A part of a checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Box<Checkpoint>>,
    /// For people: why, or what came of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl JournalEntry {
    /// An entry of `event` now; `seq` is set when it is appended.
    pub fn new(event: Event) -> Self {
        Self {
            seq: 0,
            ts: Timestamp::now(),
            event,
            key: None,
            rule: None,
            action: None,
            target: None,
            alert: None,
            dry_run: false,
            force: false,
            reason: None,
            left_s: None,
            attempts: None,
            window_s: None,
            awake: None,
            checkpoint: None,
            detail: None,
        }
    }

    /// An entry of `event` about the run `key` of `plan`.
    pub fn run(event: Event, key: &RunKey, plan: &Plan, alert: Option<&AlertRef>) -> Self {
        Self {
            key: Some(key.clone()),
            rule: Some(plan.rule.clone()),
            action: Some(plan.action),
            target: plan.target.clone(),
            alert: alert.cloned(),
            dry_run: plan.dry_run,
            ..Self::new(event)
        }
    }

    /// The same run, a later event.
    pub fn next(&self, event: Event) -> Self {
        Self {
            key: self.key.clone(),
            rule: self.rule.clone(),
            action: self.action,
            target: self.target.clone(),
            alert: self.alert.clone(),
            dry_run: self.dry_run,
            force: self.force,
            ..Self::new(event)
        }
    }

    /// Says why the run was skipped: the tag, its data and the words.
    pub fn because(mut self, skip: &Skip) -> Self {
        self.reason = Some(skip.reason());
        match skip {
            Skip::Cooldown(left) => self.left_s = Some(left.as_secs().max(1)),
            Skip::Exhausted { attempts, window } => {
                self.attempts = Some(*attempts);
                self.window_s = Some(window.as_secs());
            }
            _ => {}
        }
        self.with_detail(skip.to_string())
    }

    /// Sets `detail`, cut to [`MAX_DETAIL_BYTES`].
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        let mut detail = detail.into();
        if detail.len() > MAX_DETAIL_BYTES {
            let end = cut_bytes(&detail, MAX_DETAIL_BYTES).len();
            detail.truncate(end);
            detail.push_str("...");
        }
        self.detail = Some(detail);
        self
    }
}

/// Gives an entry written by release 0.1.0 the `reason` tag its `detail` stood for. 0.1.0's
/// wording is frozen: these prefixes are the whole of what it wrote.
pub fn upgrade_0_1_0(entry: &mut JournalEntry) {
    if entry.reason.is_some() || !matches!(entry.event, Event::Skipped | Event::Failed) {
        return;
    }
    let Some(detail) = entry.detail.as_deref() else {
        return;
    };
    let number = |text: &str| -> Option<u64> {
        text.split(|c: char| !c.is_ascii_digit())
            .find(|n| !n.is_empty())?
            .parse()
            .ok()
    };
    let reason = if entry.event == Event::Failed {
        if detail.starts_with("interrupted:") {
            Reason::Interrupted
        } else if detail.starts_with("timed out after") {
            Reason::TimedOut
        } else if detail.contains("action is not available") {
            Reason::Unavailable
        } else {
            Reason::Error
        }
    } else if detail == "paused" {
        Reason::Paused
    } else if detail.starts_with("duplicate:") {
        Reason::Duplicate
    } else if detail.starts_with("already done:") {
        Reason::AlreadyDone
    } else if detail.starts_with("resolved:") {
        Reason::Resolved
    } else if let Some(rest) = detail.strip_prefix("cooldown:") {
        entry.left_s = number(rest);
        Reason::Cooldown
    } else if let Some(rest) = detail.strip_prefix("repairs exhausted:") {
        let mut numbers = rest
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse::<u64>().ok());
        entry.attempts = numbers.next().and_then(|n| u32::try_from(n).ok());
        entry.window_s = numbers.next();
        Reason::Exhausted
    } else if detail.starts_with("condition no longer true:") {
        Reason::ConditionGone
    } else if detail.starts_with("not this host:") {
        Reason::NotThisHost
    } else if detail.starts_with("not allowlisted:") || detail.contains("allowlist") {
        Reason::NotAllowlisted
    } else if detail.starts_with("no target:") || detail.contains("needs a target") {
        Reason::NoTarget
    } else if detail.starts_with("overloaded:") {
        Reason::Overloaded
    } else if detail.starts_with("dry-run") {
        Reason::DryRun
    } else {
        return;
    };
    entry.reason = Some(reason);
}

/// Why the journal could not be read or written.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JournalError {
    /// An I/O error on a journal file.
    #[error("journal {}: {op}: {message}", path.display())]
    Io {
        /// The file (or the directory).
        path: PathBuf,
        /// What was being done.
        op: Op,
        /// What the OS said.
        message: String,
        /// Its error number, when it gave one.
        errno: Option<i32>,
    },
    /// This replica's lease may have passed to another (see [`crate::fence`]): it must not
    /// write, nor act.
    #[error(
        "not writing the journal: the lease's renew deadline passed {0:.1?} ago, another replica may lead"
    )]
    Fenced(Duration),
}

/// The file-system steps the journal takes: where faults are injected in tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Creating the directory, listing it.
    Dir,
    /// Opening a file to read it back.
    OpenRead,
    /// Reading a line.
    Read,
    /// Opening the current file for appending.
    OpenAppend,
    /// Creating the next file at a rotation.
    Create,
    /// Writing a batch.
    Write,
    /// Syncing a file.
    Sync,
    /// Cutting a file back after a failed write.
    Truncate,
    /// Linking the current file to its archive name.
    Link,
    /// Renaming a file.
    Rename,
    /// Removing a file.
    Remove,
    /// Syncing the directory.
    SyncDir,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Dir => "directory",
            Self::OpenRead => "open",
            Self::Read => "read",
            Self::OpenAppend => "open for append",
            Self::Create => "create",
            Self::Write => "write",
            Self::Sync => "fsync",
            Self::Truncate => "truncate",
            Self::Link => "link",
            Self::Rename => "rename",
            Self::Remove => "remove",
            Self::SyncDir => "fsync directory",
        })
    }
}

/// Decides, before each file-system step, whether it fails: how tests inject `ENOSPC`, `EIO`
/// or `EMFILE` at any step. The journal runs without one in production.
pub trait FaultPlan: Send + Sync + fmt::Debug {
    /// `Err` makes the step `op` on `file` fail with that error without doing it.
    fn before(&self, op: Op, file: &Path) -> io::Result<()>;
}

/// How big the journal may grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalLimits {
    /// The current file is archived past this size.
    pub max_bytes: u64,
    /// Archives kept.
    pub keep: usize,
}

impl Default for JournalLimits {
    fn default() -> Self {
        Self {
            max_bytes: 16 << 20,
            keep: 4,
        }
    }
}

/// What reading the journal back found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// Files read.
    pub files: usize,
    /// Entries read back.
    pub entries: u64,
    /// Lines skipped: torn, not JSON of an entry, invalid UTF-8, or too long.
    pub invalid: u64,
    /// Entries whose `seq` did not go up (corruption that still parses): read all the same.
    pub out_of_order: u64,
    /// Files skipped: not regular files, or a second name of a file already read.
    pub files_skipped: usize,
}

/// The journal in a state directory.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    limits: JournalLimits,
    faults: Option<Arc<dyn FaultPlan>>,
    /// The current file, `None` after a failed write until it is reopened.
    file: Option<File>,
    /// Bytes of the current file known to be on disk.
    len: u64,
    /// The first `seq` in the current file (its archive name).
    first_seq: u64,
    /// Bytes of the checkpoint the current file begins with: not counted against `max_bytes`.
    checkpoint_len: u64,
    next_seq: u64,
    /// The last write failure, until a write succeeds.
    failure: Option<JournalError>,
    /// Writes only while this is open.
    fence: Fence,
}

const CURRENT: &str = "journal.jsonl";
const NEXT: &str = "journal.next.jsonl";

/// What a file in the state directory is to the journal.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum FileKind {
    /// 0.1.0's `journal.<n>.jsonl`: the higher `n`, the older.
    Legacy(std::cmp::Reverse<u64>),
    /// `journal-<first seq>.jsonl`.
    Archive(u64),
    /// `journal.jsonl`.
    Current,
}

fn classify(name: &str) -> Option<FileKind> {
    if name == CURRENT {
        return Some(FileKind::Current);
    }
    if let Some(seq) = name
        .strip_prefix("journal-")
        .and_then(|r| r.strip_suffix(".jsonl"))
    {
        return seq.parse().ok().map(FileKind::Archive);
    }
    name.strip_prefix("journal.")
        .and_then(|r| r.strip_suffix(".jsonl"))
        .and_then(|n| n.parse().ok())
        .map(|n| FileKind::Legacy(std::cmp::Reverse(n)))
}

fn archive_name(first_seq: u64) -> String {
    format!("journal-{first_seq:020}.jsonl")
}

impl Journal {
    /// Opens the journal in `dir` (creating both when missing) and streams every entry,
    /// oldest first, into `sink`.
    pub fn open(
        dir: &Path,
        limits: JournalLimits,
        sink: impl FnMut(JournalEntry),
    ) -> Result<(Self, ReadStats), JournalError> {
        Self::open_with(dir, limits, None, sink)
    }

    /// Writes only while `fence` is open (leader election); every write checks it.
    #[must_use]
    pub fn fenced(mut self, fence: Fence) -> Self {
        self.fence = fence;
        self
    }

    /// As [`Journal::open`], with faults injected at the steps `faults` chooses.
    pub fn open_with(
        dir: &Path,
        limits: JournalLimits,
        faults: Option<Arc<dyn FaultPlan>>,
        mut sink: impl FnMut(JournalEntry),
    ) -> Result<(Self, ReadStats), JournalError> {
        let mut journal = Self {
            dir: dir.to_owned(),
            limits,
            faults,
            file: None,
            len: 0,
            first_seq: 0,
            checkpoint_len: 0,
            next_seq: 1,
            failure: None,
            fence: Fence::none(),
        };
        journal.step(Op::Dir, dir, || std::fs::create_dir_all(dir))?;
        // A rotation that stopped half-way left its unfinished next file: what it held is in
        // the current file or its archive already.
        let _ = journal.step(Op::Remove, &dir.join(NEXT), || {
            match std::fs::remove_file(dir.join(NEXT)) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                other => other,
            }
        });
        let mut stats = ReadStats::default();
        let mut seqs = Seqs::default();
        let mut current = FileRead::default();
        let mut seen = std::collections::HashSet::new();
        for (kind, name) in journal.files()? {
            let path = dir.join(&name);
            // Only regular files, each once: a directory or a FIFO named like an archive is
            // left alone, and a second name of a file (a rotation that stopped after its
            // link) is not read twice.
            match std::fs::metadata(&path) {
                Ok(meta) if meta.is_file() => {
                    use std::os::unix::fs::MetadataExt as _;
                    if !seen.insert((meta.dev(), meta.ino())) {
                        stats.files_skipped += 1;
                        continue;
                    }
                }
                Ok(_) => {
                    tracing::warn!(file = %path.display(), "not a regular file: left alone");
                    stats.files_skipped += 1;
                    continue;
                }
                Err(_) => continue,
            }
            stats.files += 1;
            let read = journal.read_file(&path, &mut stats, &mut seqs, &mut sink)?;
            if kind == FileKind::Current {
                current = read;
            }
        }
        journal.next_seq = seqs.max + 1;
        journal.first_seq = current.first_seq.unwrap_or(journal.next_seq);
        journal.checkpoint_len = current.checkpoint_len;
        journal.reopen()?;
        Ok((journal, stats))
    }

    /// Runs a file-system step, unless the fault plan fails it first.
    fn step<T>(
        &self,
        op: Op,
        path: &Path,
        f: impl FnOnce() -> io::Result<T>,
    ) -> Result<T, JournalError> {
        let result = match &self.faults {
            Some(faults) => faults.before(op, path).and_then(|()| f()),
            None => f(),
        };
        result.map_err(|e| JournalError::Io {
            path: path.to_owned(),
            op,
            errno: e.raw_os_error(),
            message: e.to_string(),
        })
    }

    /// The journal's files, oldest first.
    fn files(&self) -> Result<Vec<(FileKind, String)>, JournalError> {
        let entries = self.step(Op::Dir, &self.dir, || {
            std::fs::read_dir(&self.dir)?
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<io::Result<Vec<String>>>()
        })?;
        let mut files: Vec<(FileKind, String)> = entries
            .into_iter()
            .filter_map(|name| Some((classify(&name)?, name)))
            .collect();
        files.sort();
        Ok(files)
    }

    /// Streams one file's entries into `sink`.
    fn read_file(
        &self,
        path: &Path,
        stats: &mut ReadStats,
        seqs: &mut Seqs,
        sink: &mut impl FnMut(JournalEntry),
    ) -> Result<FileRead, JournalError> {
        let mut found = FileRead::default();
        let opened = self.step(Op::OpenRead, path, || {
            use std::os::unix::fs::OpenOptionsExt as _;
            // Never blocks, should the file have become a FIFO since it was listed.
            OpenOptions::new()
                .read(true)
                .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
                .open(path)
        });
        let file = match opened {
            Ok(file) => file,
            // Aged out between listing and opening.
            Err(JournalError::Io { errno: Some(2), .. }) => return Ok(found),
            Err(e) => return Err(e),
        };
        let mut reader = BufReader::with_capacity(64 * 1024, file);
        let mut line = Vec::with_capacity(1024);
        let mut leading_checkpoint = true;
        loop {
            let read = self.step(Op::Read, path, || {
                read_line(&mut reader, &mut line, MAX_LINE_BYTES)
            })?;
            match read {
                Line::End => break,
                Line::Blank => {}
                Line::TooLong => {
                    stats.invalid += 1;
                    tracing::warn!(file = %path.display(), "skipping a journal line longer than {MAX_LINE_BYTES} bytes");
                }
                Line::Text => match serde_json::from_slice::<JournalEntry>(&line) {
                    Ok(entry) if entry.seq > MAX_SEQ => {
                        stats.invalid += 1;
                        tracing::warn!(file = %path.display(), seq = entry.seq, "skipping a journal line whose seq cannot be real");
                    }
                    Ok(mut entry) => {
                        if entry.seq <= seqs.last {
                            // Read all the same: one corrupt number must not hide what follows.
                            stats.out_of_order += 1;
                            tracing::warn!(file = %path.display(), seq = entry.seq, "a journal entry whose seq does not go up");
                        }
                        seqs.last = entry.seq;
                        seqs.max = seqs.max.max(entry.seq);
                        found.first_seq.get_or_insert(entry.seq);
                        if leading_checkpoint && entry.event == Event::Checkpoint {
                            found.checkpoint_len += line.len() as u64 + 1;
                        } else {
                            leading_checkpoint = false;
                        }
                        upgrade_0_1_0(&mut entry);
                        stats.entries += 1;
                        sink(entry);
                    }
                    Err(err) => {
                        stats.invalid += 1;
                        tracing::warn!(file = %path.display(), %err, "skipping an unreadable journal line");
                    }
                },
            }
        }
        Ok(found)
    }

    /// (Re)opens the current file for appending, cutting off whatever a failed write left
    /// past the last synced byte (until it can, it takes no writes: a batch answered with an
    /// error must never be read back), and ending a line torn by a crash.
    fn reopen(&mut self) -> Result<(), JournalError> {
        let path = self.dir.join(CURRENT);
        let existed = path.exists();
        let file = self.step(Op::OpenAppend, &path, || {
            OpenOptions::new()
                .create(true)
                .read(true)
                .append(true)
                .open(&path)
        })?;
        let on_disk = self.step(Op::OpenAppend, &path, || file.metadata().map(|m| m.len()))?;
        let recovering = self.failure.is_some();
        if recovering && on_disk > self.len {
            let len = self.len;
            self.step(Op::Truncate, &path, || file.set_len(len))?;
        } else if on_disk > 0 && !recovering {
            let ends_cleanly =
                self.step(Op::Read, &path, || last_byte(&file, on_disk))? == Some(b'\n');
            if !ends_cleanly {
                self.step(Op::Write, &path, || (&file).write_all(b"\n"))?;
            }
        }
        self.step(Op::Sync, &path, || file.sync_all())?;
        if !existed {
            self.sync_dir()?;
        }
        self.len = self.step(Op::OpenAppend, &path, || file.metadata().map(|m| m.len()))?;
        self.file = Some(file);
        Ok(())
    }

    fn sync_dir(&self) -> Result<(), JournalError> {
        self.step(Op::SyncDir, &self.dir, || File::open(&self.dir)?.sync_all())
    }

    /// The last write failure, while the journal cannot be written.
    pub fn failure(&self) -> Option<&JournalError> {
        self.failure.as_ref()
    }

    /// Numbers the entries, writes them as one batch and syncs the file to disk. On an error
    /// nothing of the batch counts: the file is cut back before the next batch.
    pub fn append(&mut self, entries: &mut [JournalEntry]) -> Result<(), JournalError> {
        if entries.is_empty() {
            return Ok(());
        }
        self.fence.check().map_err(JournalError::Fenced)?;
        if self.file.is_none() {
            self.reopen()
                .inspect_err(|e| self.failure = Some(e.clone()))?;
        }
        // Sequence numbers are used up even when the write fails: lines a failed write left
        // behind must never share a number with what is written after.
        let buffer = self.serialize(entries);
        let path = self.dir.join(CURRENT);
        let file = self.file.as_ref().expect("reopened above");
        let written = self
            .step(Op::Write, &path, || {
                let mut file = file;
                file.write_all(&buffer)
            })
            .and_then(|()| self.step(Op::Sync, &path, || file.sync_data()));
        match written {
            Ok(()) => {
                self.len += buffer.len() as u64;
                if self.failure.take().is_some() {
                    tracing::info!("the journal is writable again");
                }
                Ok(())
            }
            Err(err) => {
                // Cut back what may have landed; reopen (a new descriptor) before the next batch.
                let len = self.len;
                let _ = self.step(Op::Truncate, &path, || file.set_len(len));
                self.file = None;
                self.failure = Some(err.clone());
                Err(err)
            }
        }
    }

    fn serialize(&mut self, entries: &mut [JournalEntry]) -> Vec<u8> {
        let mut buffer = Vec::with_capacity(entries.len() * 320);
        for entry in entries.iter_mut() {
            entry.seq = self.next_seq;
            self.next_seq += 1;
            serde_json::to_writer(&mut buffer, entry).expect("journal entries serialize");
            buffer.push(b'\n');
        }
        buffer
    }

    /// Whether the current file has passed `max_bytes` (its checkpoint not counted, so a
    /// large checkpoint never makes every batch rotate).
    pub fn wants_rotation(&self) -> bool {
        self.failure.is_none()
            && self.len.saturating_sub(self.checkpoint_len) >= self.limits.max_bytes
    }

    /// Archives the current file and begins a new one with `checkpoint` (the ledger now), then
    /// drops archives past `keep`. On an error the current file stays as it was.
    pub fn rotate(&mut self, checkpoint: &mut [JournalEntry]) -> Result<(), JournalError> {
        // Checked before each step that changes the files: a leader frozen while it builds
        // or syncs the checkpoint must not put its stale state over a new leader's file.
        let fenced = |journal: &Self| journal.fence.check().map_err(JournalError::Fenced);
        fenced(self)?;
        let current = self.dir.join(CURRENT);
        let next = self.dir.join(NEXT);
        let archive = self.dir.join(archive_name(self.first_seq));
        let first_of_next = self.next_seq;
        let buffer = self.serialize(checkpoint);
        let staged = self
            .step(Op::Create, &next, || {
                OpenOptions::new()
                    .create(true)
                    .truncate(true)
                    .write(true)
                    .open(&next)
            })
            .and_then(|file| {
                self.step(Op::Write, &next, || (&file).write_all(&buffer))?;
                self.step(Op::Sync, &next, || file.sync_all())?;
                Ok(file)
            });
        let file = match staged {
            Ok(file) => file,
            Err(err) => {
                self.remove_quietly(&next);
                return Err(err);
            }
        };
        // The current file keeps its name until the new one replaces it in one rename.
        if let Err(err) = fenced(self).and_then(|()| self.archive_current(&current, &archive)) {
            self.remove_quietly(&next);
            return Err(err);
        }
        let renamed = fenced(self)
            .and_then(|()| self.step(Op::Rename, &next, || std::fs::rename(&next, &current)));
        if let Err(err) = renamed {
            if same_file(&archive, &current) {
                self.remove_quietly(&archive);
            }
            self.remove_quietly(&next);
            return Err(err);
        }
        // The rename is done; a failed directory sync only makes it less certain to last.
        if let Err(err) = self.sync_dir() {
            tracing::warn!(%err, "journal rotated, but the directory could not be synced");
        }
        // Append mode from here on: the staged file was opened for writing at its end.
        self.file = Some(file);
        self.len = buffer.len() as u64;
        self.checkpoint_len = self.len;
        self.first_seq = first_of_next;
        self.prune();
        Ok(())
    }

    /// Gives the current file its archive name too (a hard link); where the file system has no
    /// hard links, the archive is a copy.
    fn archive_current(&self, current: &Path, archive: &Path) -> Result<(), JournalError> {
        match self.step(Op::Link, archive, || std::fs::hard_link(current, archive)) {
            Ok(()) => Ok(()),
            // A rotation that stopped after the link left it: it is this very file.
            Err(_) if same_file(archive, current) => Ok(()),
            Err(JournalError::Io {
                errno: Some(code), ..
            }) if no_hard_links(code) => {
                self.step(Op::Write, archive, || {
                    std::fs::copy(current, archive).map(drop)
                })?;
                self.step(Op::Sync, archive, || File::open(archive)?.sync_all())
            }
            Err(err) => Err(err),
        }
    }

    /// Removes the oldest archives past `keep`.
    fn prune(&self) {
        let Ok(files) = self.files() else {
            return;
        };
        let archives: Vec<&String> = files
            .iter()
            .filter(|(kind, _)| *kind != FileKind::Current)
            .map(|(_, name)| name)
            .collect();
        let excess = archives.len().saturating_sub(self.limits.keep);
        for name in &archives[..excess] {
            self.remove_quietly(&self.dir.join(name));
        }
    }

    fn remove_quietly(&self, path: &Path) {
        if let Err(err) = self.step(Op::Remove, path, || std::fs::remove_file(path)) {
            tracing::debug!(%err, "journal: could not remove a file");
        }
    }
}

/// What reading the files found about their sequence numbers.
#[derive(Debug, Default)]
struct Seqs {
    /// Of the last entry read.
    last: u64,
    /// The largest read.
    max: u64,
}

/// What reading one file found.
#[derive(Debug, Default)]
struct FileRead {
    /// Its first entry's `seq`.
    first_seq: Option<u64>,
    /// Bytes of the checkpoint it begins with.
    checkpoint_len: u64,
}

fn no_hard_links(errno: i32) -> bool {
    use rustix::io::Errno;
    [Errno::PERM, Errno::OPNOTSUPP, Errno::XDEV, Errno::MLINK]
        .iter()
        .any(|e| e.raw_os_error() == errno)
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// The last byte of `file`, `len` bytes long.
fn last_byte(file: &File, len: u64) -> io::Result<Option<u8>> {
    use std::os::unix::fs::FileExt as _;
    if len == 0 {
        return Ok(None);
    }
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, len - 1)?;
    Ok(Some(byte[0]))
}

/// What [`read_line`] found.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// A line, in the buffer (without its newline; the last line of a file may lack one).
    Text,
    /// An empty or all-blank line.
    Blank,
    /// A line longer than allowed, skipped without keeping it.
    TooLong,
    /// The end of the file.
    End,
}

/// Reads the next line into `line`, keeping at most `max` bytes in memory.
fn read_line(reader: &mut impl BufRead, line: &mut Vec<u8>, max: usize) -> io::Result<Line> {
    line.clear();
    let mut too_long = false;
    let mut any = false;
    loop {
        let available = reader.fill_buf()?;
        if available.is_empty() {
            return Ok(match (any, too_long) {
                (false, _) => Line::End,
                (true, true) => Line::TooLong,
                (true, false) if line.iter().all(u8::is_ascii_whitespace) => Line::Blank,
                (true, false) => Line::Text,
            });
        }
        any = true;
        let (chunk, done) = match available.iter().position(|b| *b == b'\n') {
            Some(end) => (&available[..end], Some(end + 1)),
            None => (available, None),
        };
        if !too_long && line.len() + chunk.len() <= max {
            line.extend_from_slice(chunk);
        } else {
            too_long = true;
            line.clear();
        }
        let used = done.unwrap_or(chunk.len());
        reader.consume(used);
        if done.is_some() {
            return Ok(if too_long {
                Line::TooLong
            } else if line.iter().all(u8::is_ascii_whitespace) {
                Line::Blank
            } else {
                Line::Text
            });
        }
    }
}

#[cfg(test)]
mod tests;
