//! Hostile load and faults against the real binaries: thousands of idle and slow connections
//! under the default open-files limit, disk and descriptor faults injected into the journal's
//! system calls (an LD_PRELOAD library, the program unmodified), a journal full to its
//! rotation limit read back, and a flood of relayed wakes. Each keeps the guarantees: /healthz
//! answers, no journal entry is lost, nothing runs twice.
//!
//! Sizes are those of `./tests/run`; `AISTACK_HOSTILE_CONNECTIONS` and
//! `AISTACK_HOSTILE_RELAYED` raise them for the long run docs/reliability.md reports.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use aistack_tests::{
    Daemon, binary, fsfaults_library, get, get_with_token, memory_kib, open_descriptors, post_json,
    raise_own_open_files_limit, wait_for, write_secret,
};
use serde_json::Value;

const TOKEN: &str = "0123456789abcdef";
const RELAY_KEY: &str = "relay-key-0123456789";

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `binary` started with the soft open-files limit most systems give: 1,024.
fn under_default_limit(name: &str) -> Command {
    let mut command = Command::new("prlimit");
    command.args(["--nofile=1024:", "--"]).arg(binary(name));
    command
}

fn actioner_config(dir: &Path, extra: &str) -> String {
    write_secret(dir.join("token"), format!("{TOKEN}\n"));
    write_secret(dir.join("relay.key"), format!("{RELAY_KEY}\n"));
    let config = dir.join("actioner.yaml");
    std::fs::write(
        &config,
        format!(
            r#"
host: gpu-box
state_dir: {state}
auth: {{bearer_token_file: {token}}}
rules:
  - {{name: wake, match: {{alertname: Wake}}, action: wake, target_label: target, dry_run: true}}
actions:
  wake:
    key_file: {relay}
    targets:
      t0: {{mac: "02:00:00:00:00:01", broadcast: 127.0.0.1, port: 9}}
{extra}
"#,
            state = dir.join("state").display(),
            token = dir.join("token").display(),
            relay = dir.join("relay.key").display(),
        ),
    )
    .unwrap();
    config.to_str().unwrap().to_owned()
}

fn webhook(fingerprint: &str) -> String {
    format!(
        r#"{{"version":"4","status":"firing","receiver":"aistack","groupKey":"{{}}:{{}}","externalURL":"http://am:9093","alerts":[{{"status":"firing","labels":{{"alertname":"Wake","target":"t0"}},"annotations":{{}},"startsAt":"2026-11-22T21:00:00Z","endsAt":"0001-01-01T00:00:00Z","fingerprint":"{fingerprint}"}}]}}"#
    )
}

/// POSTs a webhook and returns (status, planned).
fn send(actioner: &Daemon, fingerprint: &str) -> (u16, u64) {
    let reply = post_json(
        &actioner.url("/api/v1/alerts"),
        Some(TOKEN),
        &webhook(fingerprint),
    );
    let planned = serde_json::from_str::<Value>(&reply.body)
        .ok()
        .and_then(|v| v["planned"].as_u64())
        .unwrap_or(0);
    (reply.status, planned)
}

/// Every entry in the state directory's journal files, read as JSON (lines that are not are
/// returned as `Err`).
fn journal_lines(state: &Path) -> Vec<Result<Value, String>> {
    let mut files: Vec<_> = std::fs::read_dir(state)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    // journal.jsonl (the current file) sorts before journal-<seq>: read it last.
    files.sort_by_key(|p| p.file_name().unwrap() == "journal.jsonl");
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).map_err(|_| l.to_owned()))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn metric(daemon: &Daemon, line_start: &str) -> f64 {
    let body = daemon.get("/metrics").body;
    body.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{line_start} not in\n{body}"))
}

/// Opens `n` connections to `address`: even ones stay silent, odd ones send half a request
/// head and stop. Returns those that connected.
fn flood(address: &str, n: usize) -> Vec<TcpStream> {
    let target = address.parse().unwrap();
    (0..n)
        .filter_map(|i| {
            let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(2)).ok()?;
            if i % 2 == 1 {
                let _ = stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ");
            }
            Some(stream)
        })
        .collect()
}

/// GET over a new connection, with the time it took.
fn timed_get(url: &str, token: Option<&str>) -> (u16, Duration) {
    let started = Instant::now();
    let reply = match token {
        Some(token) => get_with_token(url, token),
        None => get(url),
    };
    (reply.status, started.elapsed())
}

#[test]
fn ten_thousand_idle_and_slow_connections_lock_nobody_out() {
    let own = raise_own_open_files_limit();
    let n = env_count("AISTACK_HOSTILE_CONNECTIONS", 10_000).min(own as usize - 200);
    let dir = tempfile::tempdir().unwrap();
    let config = actioner_config(dir.path(), "");
    let exporter = Daemon::start_with(
        under_default_limit("aistack-exporter"),
        &[
            "--no-collector.gpu",
            "--no-collector.docker",
            "--no-collector.logind",
        ],
    );
    let actioner = Daemon::start_with(
        under_default_limit("aistack-actioner"),
        &["--config.file", &config],
    );
    for daemon in [&exporter, &actioner] {
        let raised = wait_for(Duration::from_secs(5), "the limit raised", || {
            daemon
                .log()
                .into_iter()
                .find(|l| l.contains("raised the soft open-files limit"))
        });
        assert!(raised.contains(r#""before":1024"#), "{raised}");
    }
    for (daemon, name) in [(&exporter, "exporter"), (&actioner, "actioner")] {
        let started = Instant::now();
        let held = flood(&daemon.address, n);
        let flooded_in = started.elapsed();
        assert!(held.len() >= n * 9 / 10, "{} of {n} connected", held.len());
        // With every slot held by a silent or slow client, health checks, scrapes and
        // webhooks still get through, each on a new connection.
        let mut slowest = Duration::ZERO;
        for i in 0..20 {
            let (status, took) = timed_get(&daemon.url("/healthz"), None);
            assert_eq!(status, 200, "{name} /healthz");
            slowest = slowest.max(took);
            let (status, took) = timed_get(&daemon.url("/metrics"), None);
            assert_eq!(status, 200, "{name} /metrics");
            slowest = slowest.max(took);
            if name == "actioner" {
                let started = Instant::now();
                let (status, _) = send(daemon, &format!("{i:016x}"));
                assert_eq!(status, 200, "a webhook through the flood");
                slowest = slowest.max(started.elapsed());
            }
            // More silent clients keep arriving.
            drop(flood(&daemon.address, 50));
        }
        let descriptors = open_descriptors(daemon.pid());
        println!(
            "{name}: {} connections held open (flooded in {flooded_in:?}); slowest answer {slowest:?}; {descriptors} descriptors",
            held.len()
        );
        // Served, not locked out: a locked-out client waits for the 30 s header timeout. The
        // margin is for a 2-CPU CI machine running the other hostile tests at the same time
        // (one answer once took 1.02 s there; alone, the slowest is ~10 ms: the figures are in
        // docs/performance.md).
        assert!(slowest < Duration::from_secs(5), "{name}: {slowest:?}");
        assert!(descriptors < 1024, "{name} holds {descriptors} descriptors");
        drop(held);
    }
}

/// The journal's files in `state` (not the next file a rotation stages for a moment).
fn journal_files(state: &Path) -> usize {
    std::fs::read_dir(state)
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            let name = name.to_string_lossy();
            name == "journal.jsonl" || name.starts_with("journal-")
        })
        .count()
}

/// Waits until the (dry) run of `fingerprint` has ended: no batch is then in flight, and the
/// files are as the last one left them.
fn settled(actioner: &Daemon, fingerprint: &str) {
    wait_for(Duration::from_secs(10), "the last run to end", || {
        let tail = get_with_token(&actioner.url("/api/v1/actions?limit=5"), TOKEN).body;
        let tail: Vec<Value> = serde_json::from_str(&tail).unwrap_or_default();
        tail.iter()
            .any(|e| e["alert"]["fingerprint"] == fingerprint && e["reason"] == "dry_run")
            .then_some(())
    });
}

/// The rules file the fault library reads; `rules` empty clears it.
fn faults(path: &Path, rules: &str) {
    std::fs::write(path, rules).unwrap();
}

#[test]
fn the_journal_survives_disk_and_descriptor_faults_at_every_step() {
    let dir = tempfile::tempdir().unwrap();
    let config = actioner_config(
        dir.path(),
        "limits: {journal_max_bytes: 65536, journal_keep: 100}",
    );
    let rules = dir.path().join("faults");
    let injected = dir.path().join("injected");
    faults(&rules, "");
    let start = || {
        let mut command = Command::new(binary("aistack-actioner"));
        command
            .env("LD_PRELOAD", fsfaults_library())
            .env("FSFAULTS_RULES", &rules)
            .env("FSFAULTS_LOG", &injected);
        Daemon::start_with(command, &["--config.file", &config])
    };
    let actioner = start();
    let mut answered = Vec::new();
    let mut next = 0u64;
    let mut fresh = || {
        next += 1;
        format!("{next:016x}")
    };

    // A write that fails, one cut short by a full disk, an fsync that fails: each webhook
    // is answered 500 (Alertmanager retries), /healthz says why, and the retry goes through.
    for (rule, what) in [
        ("write journal.jsonl 28", "ENOSPC on write"),
        ("shortwrite journal.jsonl 28", "a short write, then ENOSPC"),
        ("fsync journal.jsonl 5", "EIO on fsync"),
    ] {
        let fingerprint = fresh();
        faults(&rules, rule);
        assert_eq!(send(&actioner, &fingerprint).0, 500, "{what}");
        let health = actioner.get("/healthz");
        assert_eq!(health.status, 503, "{what}");
        assert!(health.body.contains("journal"), "{}", health.body);
        assert_eq!(metric(&actioner, "aistack_actioner_journal_writable"), 0.0);
        faults(&rules, "");
        assert_eq!(send(&actioner, &fingerprint), (200, 1), "{what}: the retry");
        assert_eq!(actioner.get("/healthz").status, 200);
        answered.push(fingerprint);
    }

    // Rotation failing at each of its steps, for two hundred webhooks each (the current file
    // passes its limit after about seventy): every webhook is answered 200 and journaled; the current file just grows, and nothing is shifted or
    // dropped. Once the fault is gone, the next rotation goes through.
    for (rule, what) in [
        ("open journal.next 24", "EMFILE creating the next file"),
        ("write journal.next 28", "ENOSPC writing the checkpoint"),
        ("link journal- 5", "EIO linking the archive"),
        (
            "rename journal.jsonl 5",
            "EIO renaming the next file over the current one",
        ),
    ] {
        faults(&rules, rule);
        let state = dir.path().join("state");
        let files_before = journal_files(&state);
        for _ in 0..200 {
            let fingerprint = fresh();
            assert_eq!(send(&actioner, &fingerprint), (200, 1), "{what}");
            answered.push(fingerprint);
        }
        assert_eq!(actioner.get("/healthz").status, 200, "{what}");
        settled(&actioner, answered.last().unwrap());
        let files = journal_files(&state);
        assert_eq!(files, files_before, "{what}: no file came or went");
        faults(&rules, "");
        let fingerprint = fresh();
        assert_eq!(send(&actioner, &fingerprint), (200, 1));
        settled(&actioner, &fingerprint);
        answered.push(fingerprint);
        assert_eq!(
            journal_files(&state),
            files + 1,
            "{what}: rotated once the fault was gone"
        );
    }
    let injected = std::fs::read_to_string(&injected).unwrap_or_default();
    for call in ["write", "shortwrite", "fdatasync", "open", "link", "rename"] {
        assert!(
            injected.lines().any(|l| l.starts_with(call)),
            "the library injected no {call} fault: {injected}"
        );
    }
    let rotate_errors = metric(
        &actioner,
        r#"aistack_actioner_journal_errors_total{op="rotate"}"#,
    );
    assert!(rotate_errors >= 400.0, "{rotate_errors}");
    drop(actioner);

    // Nothing lost, nothing twice: every answered firing is planned exactly once, every line
    // reads back, and after a restart each re-send is recognised.
    let lines = journal_lines(&dir.path().join("state"));
    let invalid: Vec<&String> = lines.iter().filter_map(|l| l.as_ref().err()).collect();
    assert!(invalid.is_empty(), "unreadable lines: {invalid:?}");
    let mut planned: BTreeMap<String, usize> = BTreeMap::new();
    for entry in lines.iter().flatten() {
        if entry["event"] == "planned" {
            let fingerprint = entry["alert"]["fingerprint"].as_str().unwrap().to_owned();
            *planned.entry(fingerprint).or_default() += 1;
        }
    }
    for fingerprint in &answered {
        assert_eq!(planned.get(fingerprint), Some(&1), "{fingerprint}");
    }
    faults(&rules, "");
    let actioner = start();
    for fingerprint in &answered {
        assert_eq!(
            send(&actioner, fingerprint),
            (200, 0),
            "{fingerprint} ran twice"
        );
    }
}

#[test]
fn once_only_outlives_the_journal_files_rotation_drops() {
    let dir = tempfile::tempdir().unwrap();
    let config = actioner_config(
        dir.path(),
        "limits: {journal_max_bytes: 65536, journal_keep: 1}",
    );
    let actioner = Daemon::start("aistack-actioner", &["--config.file", &config]);
    let fingerprints: Vec<String> = (0..600).map(|i| format!("{i:016x}")).collect();
    for fingerprint in &fingerprints {
        assert_eq!(send(&actioner, fingerprint), (200, 1));
    }
    drop(actioner);
    let files = std::fs::read_dir(dir.path().join("state")).unwrap().count();
    assert_eq!(files, 2, "the current file and one archive");
    let first = journal_lines(&dir.path().join("state"));
    assert!(
        !first
            .iter()
            .flatten()
            .any(|e| e["alert"]["fingerprint"] == fingerprints[0].as_str()),
        "the first firing's entries were rotated out"
    );
    let actioner = Daemon::start("aistack-actioner", &["--config.file", &config]);
    for fingerprint in &fingerprints {
        assert_eq!(
            send(&actioner, fingerprint),
            (200, 0),
            "{fingerprint} ran again"
        );
    }
}

/// A journal of `firings` firings (received, planned, started, succeeded each), split into
/// files of about `file_bytes`, as the actioner would have written it.
fn write_full_journal(state: &Path, firings: usize, file_bytes: usize) {
    std::fs::create_dir_all(state).unwrap();
    let mut seq = 0u64;
    let mut files: Vec<(u64, String)> = Vec::new();
    let mut current = String::new();
    let mut first_seq = 1;
    for i in 0..firings {
        let fingerprint = format!("{i:016x}");
        let alert = format!(
            r#""alert":{{"name":"Wake","fingerprint":"{fingerprint}","status":"firing","starts_at":"2026-11-22T21:00:00Z"}}"#
        );
        let key = format!(
            r#""key":"wake|{fingerprint}|2026-11-22T21:00:00Z|firing","rule":"wake","action":"wake","target":"t0""#
        );
        for (event, rest) in [
            ("received", format!(r#"{alert},"detail":"1 rule(s) match""#)),
            ("planned", format!("{key},{alert}")),
            (
                "started",
                format!(r#"{key},{alert},"awake":{{"boot_id":"b","monotonic_ms":1}}"#),
            ),
            (
                "succeeded",
                format!(
                    r#"{key},{alert},"detail":"magic packet for 02:00:00:00:00:01 sent to 127.0.0.1:9""#
                ),
            ),
        ] {
            seq += 1;
            current.push_str(&format!(
                r#"{{"seq":{seq},"ts":"2026-11-22T21:00:00.000Z","event":"{event}",{rest}}}"#
            ));
            current.push('\n');
        }
        if current.len() >= file_bytes {
            files.push((first_seq, std::mem::take(&mut current)));
            first_seq = seq + 1;
        }
    }
    for (first, text) in &files {
        std::fs::write(state.join(format!("journal-{first:020}.jsonl")), text).unwrap();
    }
    std::fs::write(state.join("journal.jsonl"), current).unwrap();
}

#[test]
fn a_full_journal_is_read_back_in_little_memory() {
    let dir = tempfile::tempdir().unwrap();
    let config = actioner_config(dir.path(), "");
    // Four archives and a current file of 16 MiB: the most the default limits keep.
    write_full_journal(&dir.path().join("state"), 72_000, 16 << 20);
    let bytes: u64 = std::fs::read_dir(dir.path().join("state"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(bytes > 64 << 20, "{bytes}");
    let started = Instant::now();
    let actioner = Daemon::start("aistack-actioner", &["--config.file", &config]);
    let took = started.elapsed();
    let (peak, rss) = memory_kib(actioner.pid());
    println!(
        "read back {} MiB of journal in {took:?}; peak RSS {} MiB, RSS {} MiB",
        bytes >> 20,
        peak >> 10,
        rss >> 10
    );
    assert!(peak < 64 << 10, "peak RSS {peak} KiB at start");
    // Every firing in it is known: the oldest, one in the middle, the newest.
    for i in [0, 36_000, 71_999] {
        assert_eq!(
            send(&actioner, &format!("{i:016x}")),
            (200, 0),
            "firing {i}"
        );
    }
}

#[test]
fn a_flood_of_relayed_wakes_changes_nothing_else() {
    let n = env_count("AISTACK_HOSTILE_RELAYED", 20_000);
    let dir = tempfile::tempdir().unwrap();
    let config = actioner_config(dir.path(), "");
    let actioner = Daemon::start("aistack-actioner", &["--config.file", &config]);
    assert_eq!(send(&actioner, "00000000000000f1"), (200, 1));
    // Its (dry) run ends with an entry the executor writes: wait for it.
    wait_for(Duration::from_secs(10), "the dry run journaled", || {
        journal_lines(&dir.path().join("state"))
            .iter()
            .flatten()
            .any(|e| e["reason"] == "dry_run")
            .then_some(())
    });
    // A destination the relay may not aim at is refused before anything is journaled.
    let lines_before = journal_lines(&dir.path().join("state")).len();
    let reply = post_json(
        &actioner.url("/api/v1/wake"),
        Some(TOKEN),
        r#"{"mac":"02:00:00:00:00:99","broadcast":"10.9.8.7","port":22}"#,
    );
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert!(
        reply.body.contains("10.9.8.7 is not a broadcast address"),
        "{}",
        reply.body
    );
    assert_eq!(journal_lines(&dir.path().join("state")).len(), lines_before);
    let (_, before) = memory_kib(actioner.pid());
    let agent = ureq::Agent::new_with_config(
        ureq::config::Config::builder()
            .http_status_as_error(false)
            .build(),
    );
    let mut answers: BTreeMap<u16, usize> = BTreeMap::new();
    let started = Instant::now();
    for i in 0..n {
        let body = format!(
            r#"{{"mac":"02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}","broadcast":"127.0.0.1","port":9,"key":"{RELAY_KEY}"}}"#,
            (i >> 32) & 0xff,
            (i >> 24) & 0xff,
            (i >> 16) & 0xff,
            (i >> 8) & 0xff,
            i & 0xff
        );
        let status = agent
            .post(actioner.url("/api/v1/wake"))
            .header("content-type", "application/json")
            .send(&body)
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        *answers.entry(status).or_default() += 1;
    }
    let (_, after) = memory_kib(actioner.pid());
    println!(
        "{n} relayed wakes in {:?}: {answers:?}; RSS {} -> {} MiB",
        started.elapsed(),
        before >> 10,
        after >> 10
    );
    let sent = answers.get(&200).copied().unwrap_or(0);
    // Six a minute per client, the first six at once (one was the refused destination).
    let allowed = 6 + 6 * (started.elapsed().as_secs() as usize / 60 + 1);
    assert!(
        sent <= allowed,
        "the relay is rate-limited per client: {answers:?}"
    );
    assert_eq!(
        answers.get(&429).copied().unwrap_or(0) + sent,
        n,
        "{answers:?}"
    );
    assert!(
        after < before + 16 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
    // Once-only is untouched: the firing planned before the flood is still known.
    assert_eq!(send(&actioner, "00000000000000f1"), (200, 0));
    assert_eq!(actioner.get("/healthz").status, 200);
}

#[test]
fn an_oversized_field_is_refused_whole() {
    let dir = tempfile::tempdir().unwrap();
    let config = actioner_config(dir.path(), "");
    let actioner = Daemon::start("aistack-actioner", &["--config.file", &config]);
    let huge = "f".repeat(512 * 1024);
    let reply = post_json(
        &actioner.url("/api/v1/alerts"),
        Some(TOKEN),
        &webhook(&huge),
    );
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert!(
        reply.body.contains("fingerprint is 524288 bytes long"),
        "{}",
        reply.body
    );
    assert!(reply.body.len() < 512, "the answer does not echo it back");
    let tail = get_with_token(&actioner.url("/api/v1/actions?limit=1000"), TOKEN);
    assert!(
        tail.body.len() < 4096,
        "nothing of it was journaled: {}",
        tail.body.len()
    );
    // The journal tail pages: `before` continues where a page ended.
    for i in 0..30 {
        assert_eq!(send(&actioner, &format!("{i:016x}")).0, 200);
    }
    let page = |query: &str| -> Vec<Value> {
        serde_json::from_str(
            &get_with_token(&actioner.url(&format!("/api/v1/actions?{query}")), TOKEN).body,
        )
        .unwrap()
    };
    let first = page("limit=10");
    let last_seq = first.last().unwrap()["seq"].as_u64().unwrap();
    let second = page(&format!("limit=10&before={last_seq}"));
    assert_eq!(second[0]["seq"].as_u64().unwrap(), last_seq - 1);
}
