//! Attacks on the journal: sequence numbers read back, odd files in the state directory,
//! and checkpoints against the size limit.
//!
//! Each test's comment tells what the attack did before the code was mended; its name, what
//! must hold now.

use std::path::Path;

use aistack_actioner::journal::{Event, Journal, JournalEntry, JournalLimits};
use aistack_actioner::ledger::Ledger;
use aistack_actioner::vocab::{ActionKind, RunKey};

fn planned(key: &str) -> JournalEntry {
    JournalEntry {
        key: Some(RunKey(key.into())),
        rule: Some("r".into()),
        action: Some(ActionKind::Notify),
        ..JournalEntry::new(Event::Planned)
    }
}

fn limits() -> JournalLimits {
    JournalLimits {
        max_bytes: 1 << 30,
        keep: 4,
    }
}

fn keys(dir: &Path) -> Vec<String> {
    let mut keys = Vec::new();
    Journal::open(dir, limits(), |e| {
        if let Some(k) = e.key {
            keys.push(k.0);
        }
    })
    .unwrap();
    keys
}

/// A valid line whose seq is the largest u64 (a hand edit, a tool, corruption that still
/// parses): `next_seq = last_seq + 1` overflows. Debug builds panic at start; release builds
/// wrap to 0, and every entry written after it has a smaller seq than that line, so each is
/// skipped as "out of order" at the next start.
#[test]
fn a_line_with_the_largest_seq_neither_panics_nor_hides_what_comes_after() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("journal.jsonl"),
        "{\"seq\":18446744073709551615,\"ts\":\"2026-11-22T21:00:00.000Z\",\"event\":\"received\"}\n",
    )
    .unwrap();
    let opened = std::panic::catch_unwind(|| {
        let (mut journal, _) = Journal::open(dir.path(), limits(), drop).unwrap();
        journal.append(&mut [planned("after")]).unwrap();
    });
    assert!(opened.is_ok(), "Journal::open panicked on a valid line");
    assert_eq!(
        keys(dir.path()),
        ["after"],
        "the entry written after it is lost"
    );
}

/// One flipped bit in one seq digit ('1' 0x31 -> '9' 0x39) makes a line that still parses,
/// with a seq far ahead. Every good line after it is then "out of order" and dropped: the
/// once-only keys they held are forgotten and those firings run again after a restart.
#[test]
fn one_corrupt_seq_does_not_drop_every_later_entry() {
    let dir = tempfile::tempdir().unwrap();
    let (mut journal, _) = Journal::open(dir.path(), limits(), drop).unwrap();
    for i in 1..=20 {
        journal.append(&mut [planned(&format!("k{i}"))]).unwrap();
    }
    drop(journal);
    let path = dir.path().join("journal.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    // seq 11 -> seq 19: a single bit.
    let corrupted = text.replacen("{\"seq\":11,", "{\"seq\":19,", 1);
    assert_ne!(text, corrupted);
    std::fs::write(&path, corrupted).unwrap();

    let mut ledger = Ledger::new(false);
    let (_, stats) = Journal::open(dir.path(), limits(), |e| ledger.apply(e)).unwrap();
    let forgotten: Vec<String> = (12..=18)
        .map(|i| format!("k{i}"))
        .filter(|k| !ledger.ran(&RunKey(k.clone())))
        .collect();
    assert!(
        forgotten.is_empty(),
        "one corrupt seq made {} good lines unreadable ({stats:?}); once-only forgets {forgotten:?}",
        stats.out_of_order
    );
}

/// A directory (or anything that cannot be read as a file) named like an archive stops the
/// actioner from starting at all.
#[test]
fn a_directory_named_like_an_archive_does_not_stop_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let (mut journal, _) = Journal::open(dir.path(), limits(), drop).unwrap();
    journal.append(&mut [planned("a")]).unwrap();
    drop(journal);
    std::fs::create_dir(dir.path().join("journal-00000000000000000001.jsonl")).unwrap();
    let opened = Journal::open(dir.path(), limits(), drop);
    assert!(opened.is_ok(), "{:?}", opened.err());
}

/// With the smallest allowed `limits.journal_max_bytes` (64 KiB) and a few thousand
/// once-only keys, the checkpoint alone passes the limit: the journal rotates after every
/// batch, writing (and fsyncing) the whole checkpoint each time, and the `keep` archives hold
/// nothing but checkpoints.
#[test]
fn a_checkpoint_larger_than_the_limit_does_not_rotate_every_batch() {
    let dir = tempfile::tempdir().unwrap();
    let small = JournalLimits {
        max_bytes: 64 * 1024,
        keep: 4,
    };
    let mut ledger = Ledger::new(false);
    let (mut journal, _) = Journal::open(dir.path(), small, drop).unwrap();
    let mut rotated = Vec::new();
    let mut written = 0usize;
    for batch in 0..300 {
        // Runs planned and ended: nothing stays open.
        let mut entries: Vec<JournalEntry> = (0..20)
            .flat_map(|i| {
                let run = planned(&format!(
                    "rule|{batch:04}-{i:02}|2026-11-22T21:00:00Z|firing"
                ));
                let ended = run.next(Event::Succeeded);
                [run, ended]
            })
            .collect();
        journal.append(&mut entries).unwrap();
        for e in entries {
            ledger.apply(e);
        }
        if journal.wants_rotation() {
            let mut checkpoint = ledger.checkpoint();
            written += checkpoint.len();
            journal.rotate(&mut checkpoint).unwrap();
            rotated.push(batch);
        }
    }
    // A batch is ~9 KiB: about one rotation in seven batches is what the limit asks for.
    let last_fifty = rotated.iter().filter(|b| **b >= 250).count();
    assert!(
        last_fifty < 25,
        "{} rotations for 300 batches, {last_fifty} in the last 50 ({written} checkpoint lines written)",
        rotated.len()
    );
}

/// A FIFO named like an archive (anyone with write access to the state directory, or a
/// stray `mkfifo`): `Journal::open` blocks for ever in `open(2)`, and the actioner never
/// starts nor says why.
#[test]
fn a_fifo_named_like_an_archive_does_not_hang_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("journal-00000000000000000001.jsonl");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let path = dir.path().to_owned();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let opened = Journal::open(&path, limits(), drop).map(drop);
        let _ = tx.send(opened);
    });
    let answer = rx.recv_timeout(std::time::Duration::from_secs(3));
    assert!(answer.is_ok(), "Journal::open still blocked after 3 s");
}

/// A firing that keeps firing is re-sent every `repeat_interval` and refused as a duplicate
/// each time, but its digest keeps its place in the once-only window: once 200,000 newer
/// firings have been planned it is forgotten, and the next re-send runs the rule again.
#[test]
fn a_firing_still_being_resent_is_not_forgotten() {
    use aistack_actioner::ledger::DEDUPE_CAPACITY;
    use aistack_actioner::vocab::Reason;
    let long = "failover|00000000000000aa|2026-11-01T00:00:00Z|firing";
    let mut ledger = Ledger::new(false);
    let mut run = planned(long);
    ledger.apply(run.clone());
    run.event = Event::Succeeded;
    ledger.apply(run.clone());
    for i in 0..DEDUPE_CAPACITY + 10 {
        let key = format!("phone|{i:016x}|2026-11-02T00:00:00Z|firing");
        let other = planned(&key);
        ledger.apply(other.clone());
        ledger.apply(other.next(Event::Succeeded));
        if i % 10_000 == 0 {
            // Alertmanager re-sends the long firing; the recorder refuses it.
            ledger.apply(JournalEntry {
                reason: Some(Reason::Duplicate),
                ..run.next(Event::Skipped)
            });
        }
    }
    assert!(
        ledger.ran(&RunKey(long.into())),
        "a firing re-sent (and refused) minutes ago is forgotten"
    );
}
