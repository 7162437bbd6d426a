//! Chaos: the actioner killed with SIGKILL at random points, 100 times, while alerts arrive and
//! are re-sent as Alertmanager would (until answered 200, and again later). Each alert asks to
//! wake its own target, so every magic packet on the wire names the alert that caused it.
//! Afterwards: no action ran twice, every answered alert is in the journal, every journal line
//! is JSON or an entry torn by a kill (never acted on), sequence numbers only go up, and the
//! last actioner caught up with every alert.

use std::collections::{BTreeMap, BTreeSet};
use std::net::UdpSocket;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use aistack_tests::{Daemon, binary, free_port, try_post_json, wait_for};
use serde_json::Value;

const TOKEN: &str = "0123456789abcdef";
const ALERTS: usize = 400;
const KILLS: usize = 100;

/// xorshift64*: reproducible from the seed the test prints.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn mac(i: usize) -> [u8; 6] {
    [0x02, 0, 0, 0, (i >> 8) as u8, i as u8]
}

fn mac_text(i: usize) -> String {
    mac(i)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn webhook(i: usize) -> String {
    format!(
        r#"{{"version":"4","status":"firing","receiver":"aistack","groupLabels":{{}},"commonLabels":{{}},"commonAnnotations":{{}},"externalURL":"http://alertmanager:9093","groupKey":"{{}}:{{alertname=\"ChaosWake\"}}","truncatedAlerts":0,"alerts":[{{"status":"firing","labels":{{"alertname":"ChaosWake","target":"t{i:03}","instance":"chaos:9470"}},"annotations":{{}},"startsAt":"2026-11-22T21:00:00Z","endsAt":"0001-01-01T00:00:00Z","generatorURL":"","fingerprint":"{i:016x}"}}]}}"#
    )
}

fn start(config: &Path, address: &str) -> Daemon {
    Daemon::start_on(
        Command::new(binary("aistack-actioner")),
        &["--config.file", config.to_str().unwrap()],
        address,
    )
}

/// Every whole journal entry of `state`, oldest file first, and how many lines were torn.
///
/// A line still being written (no newline yet) is not read: the live actioner may be mid-write.
/// A SIGKILL inside a write that crosses a page boundary can leave a torn line; the next start
/// ends it with a newline and skips it, and the entry it held was never acted on (an entry is
/// acted on only after its write returned). Any other line that is not JSON fails the test.
fn journal_lines(state: &Path) -> (Vec<Value>, usize) {
    let mut files: Vec<_> = std::fs::read_dir(state)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    // Archives (journal-<first seq>.jsonl) are older than the current journal.jsonl.
    files.sort_by_key(|p| {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        (name == "journal.jsonl", name)
    });
    let mut lines = Vec::new();
    let mut torn = 0;
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let whole = &text[..text.rfind('\n').map_or(0, |end| end + 1)];
        for (n, line) in whole.lines().enumerate() {
            match serde_json::from_str::<Value>(line) {
                Ok(value) => lines.push(value),
                Err(e) if e.is_eof() && line.starts_with("{\"seq\":") => torn += 1,
                Err(e) => panic!("{}:{}: not JSON: {e}: {line:?}", file.display(), n + 1),
            }
        }
    }
    (lines, torn)
}

#[test]
fn sigkill_at_random_points_never_runs_an_action_twice_nor_loses_an_answered_alert() {
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("chaos seed {seed} (CHAOS_SEED={seed} repeats this run)");
    let dir = tempfile::tempdir().unwrap();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    aistack_tests::write_secret(dir.path().join("token"), TOKEN);
    let targets: String = (0..ALERTS)
        .map(|i| {
            format!(
                "      t{i:03}: {{mac: \"{}\", broadcast: 127.0.0.1, port: {}}}\n",
                mac_text(i),
                udp.local_addr().unwrap().port()
            )
        })
        .collect();
    let config = dir.path().join("actioner.yaml");
    let state = dir.path().join("state");
    std::fs::write(
        &config,
        format!(
            "host: gpu-box\nstate_dir: {}\nauth: {{bearer_token_file: {}}}\nrules:\n  - {{name: wake, match: {{alertname: ChaosWake}}, on: firing, action: wake, target_label: target}}\nactions:\n  wake:\n    targets:\n{targets}",
            state.display(),
            dir.path().join("token").display(),
        ),
    )
    .unwrap();
    let address = format!("127.0.0.1:{}", free_port());
    let actioner = Arc::new(Mutex::new(Some(start(&config, &address))));

    // The wire: every magic packet, by MAC.
    let packets = Arc::new(Mutex::new(BTreeMap::<usize, usize>::new()));
    let done = Arc::new(AtomicBool::new(false));
    let listener = {
        let (packets, done) = (packets.clone(), done.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            while !done.load(Ordering::Relaxed) {
                if let Ok(n) = udp.recv(&mut buf) {
                    assert_eq!(n, 102, "a magic packet");
                    let i = (usize::from(buf[10]) << 8) | usize::from(buf[11]);
                    *packets.lock().unwrap().entry(i).or_default() += 1;
                }
            }
        })
    };

    // Alertmanager's side: each alert until answered 200, and acknowledged ones again now and
    // then (its repeat_interval, a second Alertmanager).
    let answered = Arc::new(Mutex::new(BTreeSet::<usize>::new()));
    let sent = Arc::new(AtomicUsize::new(0));
    let sender = {
        let (answered, sent, address) = (answered.clone(), sent.clone(), address.clone());
        std::thread::spawn(move || {
            let mut rng = Rng(seed.rotate_left(17) | 1);
            let url = format!("http://{address}/api/v1/alerts");
            for i in 0..ALERTS {
                loop {
                    sent.fetch_add(1, Ordering::Relaxed);
                    let ok = try_post_json(&url, Some(TOKEN), &webhook(i))
                        .is_ok_and(|r| r.status == 200);
                    if ok {
                        answered.lock().unwrap().insert(i);
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                if i > 0 && rng.below(4) == 0 {
                    let again = rng.below(i as u64) as usize;
                    let _ = try_post_json(&url, Some(TOKEN), &webhook(again));
                }
            }
        })
    };

    // The chaos: SIGKILL at random moments, then start it again on the same port.
    let mut rng = Rng(seed);
    let started = Instant::now();
    for _ in 0..KILLS {
        std::thread::sleep(Duration::from_millis(5 + rng.below(60)));
        let mut slot = actioner.lock().unwrap();
        drop(slot.take()); // Daemon's drop is SIGKILL.
        *slot = Some(start(&config, &address));
    }
    sender.join().unwrap();
    println!(
        "chaos: {KILLS} kills in {:.1}s, {} webhooks sent for {ALERTS} alerts",
        started.elapsed().as_secs_f64(),
        sent.load(Ordering::Relaxed)
    );
    assert_eq!(answered.lock().unwrap().len(), ALERTS);

    // The last actioner catches up: every planned run ends.
    let (lines, torn) = wait_for(Duration::from_secs(60), "every run to end", || {
        let (lines, torn) = journal_lines(&state);
        let mut open = BTreeSet::new();
        for e in &lines {
            let key = e["key"].as_str().unwrap_or_default().to_owned();
            match e["event"].as_str().unwrap_or_default() {
                "planned" => {
                    open.insert(key);
                }
                // A re-send recognised as a duplicate does not end the run it repeats.
                "skipped"
                    if e["detail"]
                        .as_str()
                        .is_some_and(|d| d.starts_with("duplicate")) => {}
                "succeeded" | "failed" | "skipped" => {
                    open.remove(&key);
                }
                _ => {}
            }
        }
        open.is_empty().then_some((lines, torn))
    });
    assert!(torn <= KILLS, "{torn} torn lines for {KILLS} kills");
    std::thread::sleep(Duration::from_millis(500));
    done.store(true, Ordering::Relaxed);
    listener.join().unwrap();
    drop(actioner.lock().unwrap().take());

    // Sequence numbers only go up: nothing rewritten, nothing reordered.
    let seqs: Vec<u64> = lines.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "seq went back");

    // Every alert planned exactly once; its outcome matches the wire.
    let packets = packets.lock().unwrap().clone();
    let mut outcomes = BTreeMap::<String, usize>::new();
    for i in 0..ALERTS {
        let fingerprint = format!("{i:016x}");
        let of_alert: Vec<&Value> = lines
            .iter()
            .filter(|e| e["key"].as_str().is_some_and(|k| k.contains(&fingerprint)))
            .collect();
        let planned = of_alert.iter().filter(|e| e["event"] == "planned").count();
        assert_eq!(planned, 1, "alert {i} planned {planned} times");
        let ended: Vec<&&Value> = of_alert
            .iter()
            .filter(|e| ["succeeded", "failed"].contains(&e["event"].as_str().unwrap_or("")))
            .collect();
        assert_eq!(ended.len(), 1, "alert {i}: {of_alert:#?}");
        let on_wire = packets.get(&i).copied().unwrap_or(0);
        assert!(on_wire <= 1, "alert {i} woke its target {on_wire} times");
        match ended[0]["event"].as_str().unwrap() {
            "succeeded" => assert_eq!(on_wire, 1, "alert {i} succeeded without a packet"),
            _ => assert!(
                ended[0]["detail"]
                    .as_str()
                    .unwrap_or_default()
                    .starts_with("interrupted"),
                "alert {i}: {:?}",
                ended[0]
            ),
        }
        *outcomes
            .entry(ended[0]["event"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let duplicates = lines
        .iter()
        .filter(|e| {
            e["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("duplicate"))
        })
        .count();
    println!(
        "chaos: outcomes {outcomes:?} (failed = interrupted by a kill, not retried), {duplicates} re-sends recognised, {} journal entries, {torn} lines torn by a kill",
        lines.len()
    );
}
