//! The journal: every decision the actioner makes, as JSON lines appended to
//! `<state_dir>/journal.jsonl`, flushed to disk (fsync) before the webhook is answered or an
//! action starts.
//!
//! It is read back at start, so a restart knows which alert firings already ran which rule,
//! what was interrupted, whether the actioner is paused, and which inference backend is active.
//! When the file passes `max_bytes` it is renamed to `journal.1.jsonl` (older ones shift up to
//! `journal.<keep>.jsonl`, the oldest is dropped) and a new one begins; rotation happens only
//! between whole, synced batches, so no entry is ever split or lost in it.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::alert::{Alert, AlertStatus};
use crate::config::ActionKind;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// An alert arrived.
    Received,
    /// A rule will act.
    Planned,
    /// A rule will not act (`detail` says why).
    Skipped,
    /// An action began.
    Started,
    /// It worked.
    Succeeded,
    /// It did not (`detail` says why).
    Failed,
    /// Automatic actions were paused.
    Paused,
    /// ... and resumed.
    Resumed,
}

impl Event {
    /// The name in the journal.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Received => "received",
            Self::Planned => "planned",
            Self::Skipped => "skipped",
            Self::Started => "started",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Paused => "paused",
            Self::Resumed => "resumed",
        }
    }
}

/// Which alert an entry is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertRef {
    /// `alertname`.
    pub name: String,
    /// Alertmanager's fingerprint.
    pub fingerprint: String,
    /// `firing` or `resolved`.
    pub status: AlertStatus,
    /// When it started firing.
    pub starts_at: String,
}

impl From<&Alert> for AlertRef {
    fn from(alert: &Alert) -> Self {
        Self {
            name: alert.name().to_owned(),
            fingerprint: alert.fingerprint.clone(),
            status: alert.status,
            starts_at: alert.starts_at.clone(),
        }
    }
}

/// One line of the journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// Position in the journal, increasing across restarts.
    pub seq: u64,
    /// Wall-clock time, RFC 3339.
    pub ts: String,
    /// What happened.
    pub event: Event,
    /// The run an entry belongs to: rule, alert fingerprint, startsAt and status (webhooks), or
    /// `manual:<rfc3339>:<n>`. One key runs at most once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<ActionKind>,
    /// The target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The alert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert: Option<AlertRef>,
    /// A dry run.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// Why, or what came of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl JournalEntry {
    /// An entry of `event` now; `seq` is set when it is appended.
    pub fn new(event: Event) -> Self {
        Self {
            seq: 0,
            ts: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            event,
            key: None,
            rule: None,
            action: None,
            target: None,
            alert: None,
            dry_run: false,
            detail: None,
        }
    }
}

/// Why the journal could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// An I/O error on a journal file.
    #[error("journal {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The journal files in a state directory.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
    keep: usize,
    next_seq: u64,
}

impl Journal {
    /// The current file.
    pub fn current_path(dir: &Path) -> PathBuf {
        dir.join("journal.jsonl")
    }

    fn rotated_path(dir: &Path, n: usize) -> PathBuf {
        dir.join(format!("journal.{n}.jsonl"))
    }

    /// Opens (creating the directory and file) and reads back every entry, oldest first. A
    /// torn last line (a crash mid-write) or a corrupt one is skipped with a warning.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        keep: usize,
    ) -> Result<(Self, Vec<JournalEntry>), JournalError> {
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        let mut entries = Vec::new();
        let mut files: Vec<PathBuf> = (1..=keep)
            .rev()
            .map(|n| Self::rotated_path(dir, n))
            .collect();
        files.push(Self::current_path(dir));
        for path in files.iter().filter(|p| p.exists()) {
            let reader = BufReader::new(File::open(path).map_err(io_error(path))?);
            for (n, line) in reader.lines().enumerate() {
                let line = line.map_err(io_error(path))?;
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<JournalEntry>(&line) {
                    Ok(entry) => entries.push(entry),
                    Err(err) => {
                        tracing::warn!(file = %path.display(), line = n + 1, %err, "skipping unreadable journal line")
                    }
                }
            }
        }
        let current = Self::current_path(dir);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&current)
            .map_err(io_error(&current))?;
        let mut size = file.metadata().map_err(io_error(&current))?.len();
        // A crash mid-write leaves a torn last line: end it, so the next entry starts clean.
        let ends_cleanly = std::fs::read(&current)
            .map(|bytes| bytes.last().is_none_or(|b| *b == b'\n'))
            .map_err(io_error(&current))?;
        if !ends_cleanly {
            (&file).write_all(b"\n").map_err(io_error(&current))?;
            size += 1;
        }
        let next_seq = entries.iter().map(|e| e.seq).max().map_or(1, |s| s + 1);
        Ok((
            Self {
                dir: dir.to_owned(),
                file,
                size,
                max_bytes,
                keep,
                next_seq,
            },
            entries,
        ))
    }

    /// Numbers the entries, writes them as one batch and syncs the file to disk.
    pub fn append(&mut self, entries: &mut [JournalEntry]) -> Result<(), JournalError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut buffer = Vec::with_capacity(entries.len() * 256);
        for entry in entries.iter_mut() {
            entry.seq = self.next_seq;
            self.next_seq += 1;
            serde_json::to_writer(&mut buffer, entry).expect("journal entries serialize");
            buffer.push(b'\n');
        }
        let path = Self::current_path(&self.dir);
        self.file.write_all(&buffer).map_err(io_error(&path))?;
        self.file.sync_data().map_err(io_error(&path))?;
        self.size += buffer.len() as u64;
        if self.size >= self.max_bytes {
            self.rotate()?;
        }
        Ok(())
    }

    fn rotate(&mut self) -> Result<(), JournalError> {
        let oldest = Self::rotated_path(&self.dir, self.keep);
        if oldest.exists() {
            std::fs::remove_file(&oldest).map_err(io_error(&oldest))?;
        }
        for n in (1..self.keep).rev() {
            let from = Self::rotated_path(&self.dir, n);
            if from.exists() {
                let to = Self::rotated_path(&self.dir, n + 1);
                std::fs::rename(&from, &to).map_err(io_error(&from))?;
            }
        }
        let current = Self::current_path(&self.dir);
        std::fs::rename(&current, Self::rotated_path(&self.dir, 1)).map_err(io_error(&current))?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&current)
            .map_err(io_error(&current))?;
        self.size = 0;
        // Make the renames durable.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error(&self.dir))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(event: Event, key: &str) -> JournalEntry {
        JournalEntry {
            key: Some(key.into()),
            ..JournalEntry::new(event)
        }
    }

    #[test]
    fn entries_survive_a_reopen_in_order_with_increasing_seq() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, read) = Journal::open(dir.path(), 1 << 20, 4).unwrap();
        assert!(read.is_empty());
        journal
            .append(&mut [entry(Event::Received, "a"), entry(Event::Planned, "a")])
            .unwrap();
        drop(journal);
        let (mut journal, read) = Journal::open(dir.path(), 1 << 20, 4).unwrap();
        assert_eq!(read.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
        journal.append(&mut [entry(Event::Started, "a")]).unwrap();
        let (_, read) = Journal::open(dir.path(), 1 << 20, 4).unwrap();
        assert_eq!(read.last().unwrap().seq, 3);
        assert_eq!(read.last().unwrap().event, Event::Started);
    }

    #[test]
    fn rotation_loses_nothing_until_the_oldest_file_goes() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _) = Journal::open(dir.path(), 600, 3).unwrap();
        for i in 0..40 {
            journal
                .append(&mut [entry(Event::Received, &format!("k{i}"))])
                .unwrap();
        }
        assert!(dir.path().join("journal.1.jsonl").exists());
        assert!(dir.path().join("journal.3.jsonl").exists());
        assert!(
            !dir.path().join("journal.4.jsonl").exists(),
            "at most `keep` rotated files"
        );
        let (_, read) = Journal::open(dir.path(), 600, 3).unwrap();
        let seqs: Vec<u64> = read.iter().map(|e| e.seq).collect();
        // Contiguous to the newest: whatever was kept has no hole.
        assert_eq!(*seqs.last().unwrap(), 40);
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
        assert!(seqs.len() >= 3 * 600 / 200, "{} entries kept", seqs.len());
    }

    #[test]
    fn a_torn_last_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _) = Journal::open(dir.path(), 1 << 20, 4).unwrap();
        journal.append(&mut [entry(Event::Received, "a")]).unwrap();
        drop(journal);
        let mut file = OpenOptions::new()
            .append(true)
            .open(Journal::current_path(dir.path()))
            .unwrap();
        file.write_all(br#"{"seq":2,"ts":"2026-11-22T"#).unwrap();
        let (mut journal, read) = Journal::open(dir.path(), 1 << 20, 4).unwrap();
        assert_eq!(read.len(), 1);
        journal.append(&mut [entry(Event::Planned, "a")]).unwrap();
        let (_, read) = Journal::open(dir.path(), 1 << 20, 4).unwrap();
        let events: Vec<Event> = read.iter().map(|e| e.event).collect();
        assert_eq!(
            events,
            [Event::Received, Event::Planned],
            "the entry after the tear is kept"
        );
    }

    #[test]
    fn an_unwritable_directory_is_an_error_not_a_panic() {
        let err = Journal::open(Path::new("/proc/aistack-journal"), 1 << 20, 4).unwrap_err();
        assert!(err.to_string().contains("/proc/aistack-journal"), "{err}");
    }
}
