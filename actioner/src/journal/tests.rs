//! The journal against torn lines, any bytes, and faults injected at every file-system step.

use std::collections::{BTreeSet, HashMap};
use std::io::Write as _;
use std::sync::Mutex;

use super::*;
use crate::vocab::Origin;

const ENOSPC: i32 = 28;
const EIO: i32 = 5;
const EMFILE: i32 = 24;
const EPERM: i32 = 1;

/// Fails the next `n` steps of a kind (optionally only on files whose name contains a
/// string) with an error number.
#[derive(Debug, Default)]
struct Faults {
    plan: Mutex<Vec<(Op, &'static str, i32, usize)>>,
    /// Steps seen, by kind.
    seen: Mutex<HashMap<Op, usize>>,
}

impl Faults {
    fn fail(&self, op: Op, errno: i32, times: usize) {
        self.fail_on(op, "", errno, times);
    }

    fn fail_on(&self, op: Op, name: &'static str, errno: i32, times: usize) {
        self.plan.lock().unwrap().push((op, name, errno, times));
    }

    fn clear(&self) {
        self.plan.lock().unwrap().clear();
    }
}

impl FaultPlan for Faults {
    fn before(&self, op: Op, file: &Path) -> io::Result<()> {
        *self.seen.lock().unwrap().entry(op).or_default() += 1;
        let name = file
            .file_name()
            .map_or(String::new(), |n| n.to_string_lossy().into_owned());
        let mut plan = self.plan.lock().unwrap();
        for (o, contains, errno, times) in plan.iter_mut() {
            if *o == op && *times > 0 && name.contains(*contains) {
                *times -= 1;
                return Err(io::Error::from_raw_os_error(*errno));
            }
        }
        Ok(())
    }
}

fn entry(key: &str) -> JournalEntry {
    let plan = Plan {
        rule: "r".into(),
        action: ActionKind::Notify,
        target: None,
        dry_run: false,
        cooldown: None,
        origin: Origin::Rule,
    };
    JournalEntry::run(Event::Planned, &RunKey(key.into()), &plan, None)
}

fn limits(max_bytes: u64, keep: usize) -> JournalLimits {
    JournalLimits { max_bytes, keep }
}

/// Every entry in `dir`, with what reading found.
fn read(dir: &Path) -> (Vec<JournalEntry>, ReadStats) {
    let mut entries = Vec::new();
    let (_, stats) = Journal::open(dir, limits(1 << 30, 100), |e| entries.push(e)).unwrap();
    (entries, stats)
}

fn keys(entries: &[JournalEntry]) -> Vec<String> {
    entries
        .iter()
        .filter(|e| e.event != Event::Checkpoint)
        .filter_map(|e| e.key.as_ref().map(|k| k.0.clone()))
        .collect()
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn checkpoint() -> Vec<JournalEntry> {
    vec![JournalEntry {
        checkpoint: Some(Box::new(Checkpoint {
            part: 1,
            parts: 1,
            ..Checkpoint::default()
        })),
        ..JournalEntry::new(Event::Checkpoint)
    }]
}

#[test]
fn entries_survive_a_reopen_in_order_with_increasing_seq() {
    let dir = tempfile::tempdir().unwrap();
    let (mut journal, stats) = Journal::open(dir.path(), limits(1 << 20, 4), drop).unwrap();
    assert_eq!(stats.entries, 0);
    journal.append(&mut [entry("a"), entry("b")]).unwrap();
    drop(journal);
    let (entries, _) = read(dir.path());
    assert_eq!(entries.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
    let (mut journal, _) = Journal::open(dir.path(), limits(1 << 20, 4), drop).unwrap();
    journal.append(&mut [entry("c")]).unwrap();
    let (entries, stats) = read(dir.path());
    assert_eq!(keys(&entries), ["a", "b", "c"]);
    assert_eq!(entries[2].seq, 3);
    assert_eq!((stats.invalid, stats.out_of_order), (0, 0));
}

/// A leader past its renew deadline (frozen, say) writes nothing: not a line, not a byte, and
/// no rotation puts its checkpoint over the file.
#[test]
fn a_closed_fence_writes_nothing() {
    use crate::fence::{Fence, now};
    use std::time::Duration;

    let dir = tempfile::tempdir().unwrap();
    let (journal, _) = Journal::open(dir.path(), limits(600, 2), drop).unwrap();
    let mut journal = journal.fenced(Fence::until(now() + Duration::from_secs(60)));
    journal.append(&mut [entry("a")]).unwrap();
    let before = std::fs::read(dir.path().join("journal.jsonl")).unwrap();
    let mut closed = journal.fenced(Fence::until(now()));
    let refused = closed.append(&mut [entry("b")]).unwrap_err();
    assert!(matches!(refused, JournalError::Fenced(_)), "{refused}");
    let refused = closed.rotate(&mut checkpoint()).unwrap_err();
    assert!(matches!(refused, JournalError::Fenced(_)), "{refused}");
    assert_eq!(
        std::fs::read(dir.path().join("journal.jsonl")).unwrap(),
        before
    );
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(files.len(), 1, "no archive, no next file: {files:?}");
    let (entries, _) = read(dir.path());
    assert_eq!(keys(&entries), ["a"]);
}

#[test]
fn typed_fields_round_trip_and_stay_off_the_line_when_unset() {
    let skip = Skip::Exhausted {
        attempts: 3,
        window: std::time::Duration::from_secs(3600),
    };
    let e = entry("k").because(&skip);
    let line = serde_json::to_string(&e).unwrap();
    assert!(
        line.contains(r#""reason":"exhausted","attempts":3,"window_s":3600"#),
        "{line}"
    );
    assert!(!line.contains("left_s") && !line.contains("awake") && !line.contains("force"));
    assert_eq!(serde_json::from_str::<JournalEntry>(&line).unwrap(), e);
    let long = entry("k").with_detail("é".repeat(5000));
    assert!(long.detail.unwrap().len() <= MAX_DETAIL_BYTES + 3);
}

#[test]
fn torn_and_invalid_lines_of_any_bytes_are_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (mut journal, _) = Journal::open(dir.path(), limits(1 << 20, 4), drop).unwrap();
    journal.append(&mut [entry("a")]).unwrap();
    drop(journal);
    let mut file = OpenOptions::new()
        .append(true)
        .open(dir.path().join(CURRENT))
        .unwrap();
    // Garbage, a line cut inside a two-byte character, invalid UTF-8 inside a string, a
    // repeated seq, a line far too long, and a tear with no newline at the very end.
    file.write_all(b"\x00\xff\xfe garbage\n").unwrap();
    let whole = serde_json::to_vec(&JournalEntry {
        seq: 7,
        ..entry("\u{e9}t\u{e9}")
    })
    .unwrap();
    let cut_at = whole.iter().position(|b| *b == 0xc3).unwrap() + 1;
    file.write_all(&whole[..cut_at]).unwrap();
    file.write_all(b"\n").unwrap();
    file.write_all(br#"{"seq":8,"ts":"2026-11-22T21:00:00Z","event":"planned","key":"#)
        .unwrap();
    file.write_all(b"\"\xc3\x28\"}\n").unwrap();
    file.write_all(br#"{"seq":1,"ts":"2026-11-22T21:00:00Z","event":"received"}"#)
        .unwrap();
    file.write_all(b"\n").unwrap();
    file.write_all(&vec![b'x'; MAX_LINE_BYTES + 10]).unwrap();
    file.write_all(b"\n").unwrap();
    file.write_all(&whole[..cut_at]).unwrap();
    drop(file);

    let (mut journal, stats) = Journal::open(dir.path(), limits(1 << 20, 4), drop).unwrap();
    assert_eq!(
        (stats.entries, stats.invalid, stats.out_of_order),
        // The line that repeats seq 1 parses: it is read all the same, and counted.
        (2, 5, 1)
    );
    // The torn end was ended: the next entry is read back whole.
    journal.append(&mut [entry("b")]).unwrap();
    let (entries, stats) = read(dir.path());
    assert_eq!(keys(&entries), ["a", "b"]);
    assert_eq!(stats.invalid, 5);
}

#[test]
fn a_failed_write_answers_an_error_loses_nothing_and_heals() {
    for errno in [ENOSPC, EIO, EMFILE] {
        for op in [Op::Write, Op::Sync] {
            let dir = tempfile::tempdir().unwrap();
            let faults = Arc::new(Faults::default());
            let (mut journal, _) =
                Journal::open_with(dir.path(), limits(1 << 20, 4), Some(faults.clone()), drop)
                    .unwrap();
            journal.append(&mut [entry("before")]).unwrap();
            faults.fail(op, errno, 1);
            let err = journal.append(&mut [entry("lost")]).unwrap_err();
            assert!(matches!(err, JournalError::Io { errno: Some(e), .. } if e == errno));
            assert!(
                journal.failure().is_some(),
                "reported until a write succeeds"
            );
            // Reopening fails too while descriptors are out: still an error, still reported.
            faults.fail(Op::OpenAppend, EMFILE, 1);
            assert!(journal.append(&mut [entry("also lost")]).is_err());
            journal.append(&mut [entry("after")]).unwrap();
            assert!(journal.failure().is_none());
            let (entries, stats) = read(dir.path());
            assert_eq!(keys(&entries), ["before", "after"], "{op:?} {errno}");
            assert_eq!(stats.invalid, 0);
            // The failed batch's number is not used again ("also lost" never got one: it
            // failed before it was numbered).
            assert_eq!(entries.last().unwrap().seq, 3);
        }
    }
}

#[test]
fn a_batch_that_failed_is_never_read_back_even_when_it_cannot_be_cut_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Arc::new(Faults::default());
    let (mut journal, _) =
        Journal::open_with(dir.path(), limits(1 << 20, 4), Some(faults.clone()), drop).unwrap();
    journal.append(&mut [entry("a")]).unwrap();
    // Half a line by hand (as a write cut short by ENOSPC leaves), then the batch's fsync
    // fails, and so do the next truncates.
    {
        let mut file = OpenOptions::new()
            .append(true)
            .open(dir.path().join(CURRENT))
            .unwrap();
        file.write_all(br#"{"seq":2,"ts":"2026-11-22T21:00:00Z","ev"#)
            .unwrap();
    }
    faults.fail(Op::Sync, EIO, 1);
    faults.fail(Op::Truncate, EIO, 3);
    assert!(journal.append(&mut [entry("b")]).is_err());
    // While what it left cannot be cut, nothing is written after it: an error each time.
    assert!(journal.append(&mut [entry("c")]).is_err());
    assert!(journal.append(&mut [entry("c")]).is_err());
    assert!(journal.failure().is_some());
    journal.append(&mut [entry("d")]).unwrap();
    let (entries, stats) = read(dir.path());
    // Neither the torn bytes nor the failed "b" are there; "d" reads back whole.
    assert_eq!(keys(&entries), ["a", "d"]);
    assert_eq!(stats.invalid, 0, "{stats:?}");
}

#[test]
fn rotation_archives_by_first_seq_and_begins_with_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (mut journal, _) = Journal::open(dir.path(), limits(600, 2), drop).unwrap();
    let mut rotations = 0;
    for i in 0..60 {
        journal.append(&mut [entry(&format!("k{i}"))]).unwrap();
        if journal.wants_rotation() {
            journal.rotate(&mut checkpoint()).unwrap();
            rotations += 1;
        }
    }
    assert!(rotations >= 5, "{rotations}");
    let files = names(dir.path());
    assert!(files.contains(CURRENT));
    assert_eq!(
        files.len(),
        3,
        "the current file and `keep` archives: {files:?}"
    );
    let (entries, _) = read(dir.path());
    let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "no hole: {seqs:?}"
    );
    assert_eq!(keys(&entries).last().unwrap(), "k59");
    // Each archive is named after its first entry, and each file after the first archive
    // begins with a checkpoint.
    for name in files.iter().filter(|n| n.starts_with("journal-")) {
        let first_seq: u64 = name[8..28].parse().unwrap();
        let text = std::fs::read_to_string(dir.path().join(name)).unwrap();
        let first: JournalEntry = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first.seq, first_seq, "{name}");
    }
    let current = std::fs::read_to_string(dir.path().join(CURRENT)).unwrap();
    let first: JournalEntry = serde_json::from_str(current.lines().next().unwrap()).unwrap();
    assert_eq!(first.event, Event::Checkpoint);
}

#[test]
fn a_failed_rotation_keeps_the_current_file_and_every_archive_at_every_step() {
    let steps: [(Op, &str); 6] = [
        (Op::Create, "next"),
        (Op::Write, "next"),
        (Op::Sync, "next"),
        (Op::Link, "journal-"),
        (Op::Rename, "next"),
        (Op::SyncDir, ""),
    ];
    for (op, on) in steps {
        for errno in [EMFILE, ENOSPC, EIO] {
            let dir = tempfile::tempdir().unwrap();
            let faults = Arc::new(Faults::default());
            let (mut journal, _) =
                Journal::open_with(dir.path(), limits(400, 2), Some(faults.clone()), drop).unwrap();
            let mut written = Vec::new();
            // Rotate a few times first, so there are archives that a broken rotation could
            // wrongly shift out.
            for i in 0..20 {
                let key = format!("k{i}");
                journal.append(&mut [entry(&key)]).unwrap();
                written.push(key);
                if journal.wants_rotation() {
                    journal.rotate(&mut checkpoint()).unwrap();
                }
            }
            let before = names(dir.path());
            // Now every rotation fails at this step, a hundred times over.
            faults.fail_on(op, on, errno, usize::MAX);
            for i in 20..120 {
                let key = format!("k{i}");
                journal.append(&mut [entry(&key)]).unwrap();
                written.push(key);
                if journal.wants_rotation() {
                    let outcome = journal.rotate(&mut checkpoint());
                    // A directory sync is the last step: the rotation stands without it.
                    assert_eq!(outcome.is_ok(), op == Op::SyncDir, "{op:?}");
                }
            }
            let after = names(dir.path());
            assert!(after.contains(CURRENT), "{op:?} {errno}: {after:?}");
            assert!(!after.contains(NEXT), "{op:?} {errno}: {after:?}");
            if op != Op::SyncDir {
                assert_eq!(before, after, "{op:?} {errno}: nothing shifted or dropped");
                let (entries, _) = read(dir.path());
                let read_keys = keys(&entries);
                assert!(
                    read_keys.ends_with(&written[written.len() - 100..]),
                    "{op:?} {errno}: every entry since the fault is there"
                );
            }
            // Once the fault is gone, the next rotation goes through.
            faults.clear();
            journal.append(&mut [entry("last")]).unwrap();
            assert!(journal.wants_rotation() || op == Op::SyncDir);
            if journal.wants_rotation() {
                journal.rotate(&mut checkpoint()).unwrap();
            }
            assert_eq!(keys(&read(dir.path()).0).last().unwrap(), "last");
        }
    }
}

#[test]
fn without_hard_links_the_archive_is_a_copy() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Arc::new(Faults::default());
    faults.fail(Op::Link, EPERM, usize::MAX);
    let (mut journal, _) =
        Journal::open_with(dir.path(), limits(300, 3), Some(faults), drop).unwrap();
    for i in 0..10 {
        journal.append(&mut [entry(&format!("k{i}"))]).unwrap();
        if journal.wants_rotation() {
            journal.rotate(&mut checkpoint()).unwrap();
        }
    }
    let (entries, stats) = read(dir.path());
    assert_eq!(keys(&entries).len(), 10);
    assert_eq!(stats.out_of_order, 0);
}

#[test]
fn a_link_left_by_a_rotation_that_stopped_halfway_is_read_once() {
    let dir = tempfile::tempdir().unwrap();
    let (mut journal, _) = Journal::open(dir.path(), limits(1 << 20, 4), drop).unwrap();
    journal.append(&mut [entry("a"), entry("b")]).unwrap();
    drop(journal);
    // The archive link exists, the rename over the current file never happened.
    std::fs::hard_link(dir.path().join(CURRENT), dir.path().join(archive_name(1))).unwrap();
    std::fs::write(dir.path().join(NEXT), b"{half a checkpoint").unwrap();
    let (entries, stats) = read(dir.path());
    assert_eq!(keys(&entries), ["a", "b"]);
    assert_eq!(
        stats.files_skipped, 1,
        "the second name of the same file is not read"
    );
    assert!(!dir.path().join(NEXT).exists());
}

#[test]
fn release_0_1_0_files_are_read_first_and_age_out_like_archives() {
    let dir = tempfile::tempdir().unwrap();
    let line = |seq: u64| {
        format!(r#"{{"seq":{seq},"ts":"2026-11-22T21:00:0{seq}.000Z","event":"received"}}"#)
    };
    std::fs::write(dir.path().join("journal.2.jsonl"), format!("{}\n", line(1))).unwrap();
    std::fs::write(dir.path().join("journal.1.jsonl"), format!("{}\n", line(2))).unwrap();
    std::fs::write(dir.path().join(CURRENT), format!("{}\n", line(3))).unwrap();
    let mut seqs = Vec::new();
    let (mut journal, _) = Journal::open(dir.path(), limits(400, 2), |e| seqs.push(e.seq)).unwrap();
    assert_eq!(seqs, [1, 2, 3]);
    for i in 0..4 {
        journal.append(&mut [entry(&format!("k{i}"))]).unwrap();
        if journal.wants_rotation() {
            journal.rotate(&mut checkpoint()).unwrap();
        }
    }
    let files = names(dir.path());
    assert!(
        !files.contains("journal.2.jsonl"),
        "the oldest went first: {files:?}"
    );
    assert!(files.len() <= 3, "{files:?}");
    let (entries, _) = read(dir.path());
    assert_eq!(keys(&entries), ["k0", "k1", "k2", "k3"]);
}

#[test]
fn entries_written_by_0_1_0_get_their_reason_tag() {
    let text = include_str!("../../../tests/fixtures/journal/v0.1.0/journal.jsonl");
    let expected: serde_json::Value = serde_json::from_str(include_str!(
        "../../../tests/fixtures/journal/v0.1.0/expected.json"
    ))
    .unwrap();
    let entries: Vec<JournalEntry> = text
        .lines()
        .map(|l| {
            let mut e: JournalEntry = serde_json::from_str(l).unwrap();
            upgrade_0_1_0(&mut e);
            e
        })
        .collect();
    let by_seq: HashMap<u64, &JournalEntry> = entries.iter().map(|e| (e.seq, e)).collect();
    let skipped = expected["skipped"].as_array().unwrap();
    assert!(skipped.len() >= 19);
    for want in skipped {
        let seq = want["seq"].as_u64().unwrap();
        let reason: Reason = serde_json::from_value(want["reason"].clone()).unwrap();
        assert_eq!(by_seq[&seq].reason, Some(reason), "seq {seq}");
    }
    for seq in expected["failed_interrupted_seqs"].as_array().unwrap() {
        let e = by_seq[&seq.as_u64().unwrap()];
        assert_eq!(e.reason, Some(Reason::Interrupted), "{e:?}");
    }
    let exhausted = entries
        .iter()
        .find(|e| e.reason == Some(Reason::Exhausted))
        .unwrap();
    assert_eq!(
        (exhausted.attempts, exhausted.window_s),
        (Some(1), Some(3600))
    );
    let cooldown = entries
        .iter()
        .find(|e| e.reason == Some(Reason::Cooldown))
        .unwrap();
    assert_eq!(cooldown.left_s, Some(1799));
    // Every entry read back from the fixture survives a write in the new format unchanged.
    for e in &entries {
        let again: JournalEntry = serde_json::from_str(&serde_json::to_string(e).unwrap()).unwrap();
        assert_eq!(&again, e);
    }
}

#[test]
fn reading_keeps_at_most_one_line_in_memory() {
    let text = format!("short\n{}\nafter", "y".repeat(100));
    let mut reader = io::BufReader::with_capacity(8, text.as_bytes());
    let mut line = Vec::new();
    assert_eq!(read_line(&mut reader, &mut line, 50).unwrap(), Line::Text);
    assert_eq!(line, b"short");
    assert_eq!(
        read_line(&mut reader, &mut line, 50).unwrap(),
        Line::TooLong
    );
    assert!(line.capacity() <= 64, "{}", line.capacity());
    assert_eq!(read_line(&mut reader, &mut line, 50).unwrap(), Line::Text);
    assert_eq!(line, b"after");
    assert_eq!(read_line(&mut reader, &mut line, 50).unwrap(), Line::End);
}
