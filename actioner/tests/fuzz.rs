//! Fuzzing of what the actioner takes from outside: webhook bodies, the alerts in them as the
//! rules see them, and its config file. Inputs are random bytes and byte-level mutations of
//! payloads a real Alertmanager sent (tests/fixtures/alertmanager) and of the contract's
//! config; the properties are "never panics" and, for the rules, the safety promise: whatever
//! the labels say, a target comes only from the allowlists.
//!
//! A short pass runs in ./tests/run. The long one, and the figures: docs/reliability.md
//! (`AISTACK_FUZZ_CASES=1000000 cargo test --release -p aistack-actioner --test fuzz`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use aistack_actioner::alert::{Alert, AlertStatus, MAX_ALERTS, parse_payload};
use aistack_actioner::config::Config;
use aistack_actioner::rules::{Decision, RuleSet};
use aistack_actioner::vocab::ActionKind;
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("AISTACK_FUZZ_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(2000)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        ..ProptestConfig::default()
    }
}

fn read(path: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(path);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// One of `seeds` with up to 8 byte edits (overwrite, insert, delete, cut), or random bytes.
fn input(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let count = seeds.len();
    let edit = (0u8..4, any::<usize>(), any::<u8>());
    prop_oneof![
        1 => proptest::collection::vec(any::<u8>(), 0..512),
        4 => (0..count, proptest::collection::vec(edit, 0..8)).prop_map(move |(i, edits)| {
            let mut bytes = seeds[i].clone();
            for (op, at, byte) in edits {
                let len = bytes.len();
                match op {
                    0 if len > 0 => bytes[at % len] = byte,
                    1 => bytes.insert(at % (len + 1), byte),
                    2 if len > 0 => {
                        bytes.remove(at % len);
                    }
                    3 => bytes.truncate(at % (len + 1)),
                    _ => {}
                }
            }
            bytes
        }),
    ]
}

fn webhooks() -> Vec<Vec<u8>> {
    [
        "single-firing.json",
        "grouped-firing.json",
        "mixed-resolved-firing.json",
    ]
    .iter()
    .map(|f| read(&format!("alertmanager/{f}")))
    .collect()
}

const RULES: &str = r#"
host: gpu-box
auth: {bearer_token_file: /nonexistent}
rules:
  - {name: sleep, match: {alertname: AistackHostIdle}, action: suspend}
  - {name: wake, match_re: {alertname: "Wake.*"}, action: wake, target_label: host}
  - {name: heal, match_re: {alertname: ".+"}, action: repair, target_label: container}
  - {name: fixed, match: {alertname: Fixed}, action: repair, target: ollama}
  - {name: move, match: {alertname: AistackGpuHostWorkload}, on: both, action: failover}
actions:
  wake:
    targets:
      nas: {mac: "aa:bb:cc:dd:ee:ff"}
      gpu-box: {mac: "aa:bb:cc:dd:ee:01"}
  failover:
    docker: {primary: vllm, fallback: ollama}
  repair:
    docker: {containers: [ollama, open-webui]}
    kubernetes: {deployments: ["ml/ollama"]}
"#;

/// Labels an attacker or a misconfigured rule could send: known names, near misses, junk.
fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    let name = prop_oneof![
        Just("alertname".to_owned()),
        Just("host".to_owned()),
        Just("instance".to_owned()),
        Just("container".to_owned()),
        "[a-z_]{1,10}",
    ];
    let value = prop_oneof![
        Just("AistackHostIdle".to_owned()),
        Just("WakeHost".to_owned()),
        Just("AistackGpuHostWorkload".to_owned()),
        Just("Fixed".to_owned()),
        Just("gpu-box".to_owned()),
        Just("gpu-box:9470".to_owned()),
        Just("nas".to_owned()),
        Just("ollama".to_owned()),
        Just("ml/ollama".to_owned()),
        Just("ollama ".to_owned()),
        Just("../ollama".to_owned()),
        Just("vllm".to_owned()),
        ".{0,12}",
    ];
    proptest::collection::btree_map(name, value, 0..6)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn webhook_bodies(bytes in input(webhooks())) {
        if let Ok(payload) = parse_payload(&bytes) {
            prop_assert!(payload.alerts.len() <= MAX_ALERTS);
            prop_assert!(payload.alerts.iter().all(|a| !a.fingerprint.is_empty()));
        }
    }

    #[test]
    fn targets_come_only_from_the_allowlists(labels in labels(), resolved in any::<bool>()) {
        let config: Config = aistack_common::config::parse(RULES).unwrap();
        let rules = RuleSet::new(&config).unwrap();
        let alert = Alert {
            status: if resolved { AlertStatus::Resolved } else { AlertStatus::Firing },
            labels,
            annotations: BTreeMap::new(),
            starts_at: "2026-11-22T21:00:00Z".into(),
            ends_at: String::new(),
            generator_url: String::new(),
            fingerprint: "f".into(),
        };
        let wake: BTreeSet<&str> = ["nas", "gpu-box"].into();
        let repair: BTreeSet<&str> = ["ollama", "open-webui", "ml/ollama"].into();
        for decision in rules.decide(&alert) {
            let Decision::Act(plan) = decision else { continue };
            let target = plan.target.as_deref();
            match plan.action {
                ActionKind::Wake => prop_assert!(target.is_some_and(|t| wake.contains(t)), "{plan:?}"),
                ActionKind::Repair => prop_assert!(target.is_some_and(|t| repair.contains(t)), "{plan:?}"),
                ActionKind::Suspend => prop_assert_eq!(target, Some("gpu-box")),
                ActionKind::Failover | ActionKind::Failback | ActionKind::Notify => {
                    prop_assert_eq!(target, None)
                }
            }
        }
    }

    #[test]
    fn config_files(bytes in input(vec![read("config/actioner-contract.yaml"), RULES.as_bytes().to_vec()])) {
        if let Err(problems) =
            aistack_common::config::parse::<Config>(&String::from_utf8_lossy(&bytes))
        {
            prop_assert!(!problems.is_empty());
        }
    }
}

#[test]
fn the_seeds_parse() {
    for body in webhooks() {
        assert!(parse_payload(&body).is_ok());
    }
    let config: Result<Config, _> = aistack_common::config::parse(RULES);
    assert!(config.is_ok(), "{config:?}");
}

/// Journal files of any bytes — the 0.1.0 fixture mutated, and random bytes — are read back
/// without a panic, into a ledger that folds them without a panic, and the start then writes
/// on where they end.
fn journals() -> Vec<Vec<u8>> {
    let fixture = read("journal/v0.1.0/journal.jsonl");
    let lines: Vec<&[u8]> = fixture.split(|b| *b == b'\n').collect();
    // The whole fixture, and shorter runs of its lines (mutations then land in fewer bytes).
    let mut seeds = vec![fixture.clone()];
    for chunk in lines.chunks(8) {
        seeds.push(chunk.join(&b'\n'));
    }
    seeds
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn journal_files_of_any_bytes_are_read_back(bytes in input(journals())) {
        use aistack_actioner::journal::{Journal, JournalLimits};
        use aistack_actioner::ledger::Ledger;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("journal.jsonl"), &bytes).unwrap();
        let mut ledger = Ledger::new(true);
        let (mut journal, stats) =
            Journal::open(dir.path(), JournalLimits::default(), |e| ledger.apply(e)).unwrap();
        let lines = bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()).count() as u64;
        prop_assert!(stats.entries + stats.invalid <= lines);
        let mut next = [aistack_actioner::journal::JournalEntry::new(
            aistack_actioner::journal::Event::Paused,
        )];
        journal.append(&mut next).unwrap();
        let mut again = 0;
        Journal::open(dir.path(), JournalLimits::default(), |e| {
            if e.seq == next[0].seq {
                again += 1;
            }
        })
        .unwrap();
        prop_assert_eq!(again, 1, "the entry written after them reads back whole");
        let _ = ledger.checkpoint();
    }
}
