//! The ledger, by replaying journals: the one release 0.1.0 wrote, and checkpoints.

use std::time::Duration;

use super::*;
use crate::journal::{AlertRef, upgrade_0_1_0};
use crate::vocab::{Plan, Skip};

/// The ledger's state without the display list and the checkpoint being read.
fn state(ledger: &Ledger) -> Ledger {
    Ledger {
        recent: VecDeque::new(),
        incoming: Vec::new(),
        ..ledger.clone()
    }
}

fn fixture() -> (Vec<JournalEntry>, serde_json::Value) {
    let text = include_str!("../../../tests/fixtures/journal/v0.1.0/journal.jsonl");
    let entries = text
        .lines()
        .map(|l| {
            let mut e: JournalEntry = serde_json::from_str(l).unwrap();
            upgrade_0_1_0(&mut e);
            e
        })
        .collect();
    let expected = serde_json::from_str(include_str!(
        "../../../tests/fixtures/journal/v0.1.0/expected.json"
    ))
    .unwrap();
    (entries, expected)
}

fn replay(entries: &[JournalEntry], track_resolved: bool) -> Ledger {
    let mut ledger = Ledger::new(track_resolved);
    for e in entries {
        ledger.apply(e.clone());
    }
    ledger
}

#[test]
fn a_journal_written_by_0_1_0_replays_to_the_state_it_describes() {
    let (entries, expected) = fixture();
    let ledger = replay(&entries, true);
    assert_eq!(
        ledger.paused(),
        expected["paused"].as_bool().unwrap(),
        "pause kept"
    );
    let (backend, since) = ledger.backend("");
    assert_eq!(backend.as_str(), expected["backend"].as_str().unwrap());
    assert_eq!(
        since.unwrap().to_string(),
        expected["backend_since"].as_str().unwrap()
    );
    // Nothing runs twice: every key that was planned is known to have run.
    let planned = expected["planned_keys"].as_array().unwrap();
    assert_eq!(planned.len(), 20);
    for key in planned {
        let key = RunKey(key.as_str().unwrap().into());
        assert!(ledger.ran(&key) || !key.is_once_only(), "{key}");
    }
    assert!(ledger.open_runs().next().is_none(), "every run ended");
    assert!(ledger.deferred_failbacks().next().is_none());
    let exhausted: Vec<&str> = ledger.exhausted().collect();
    let want: Vec<&str> = expected["exhausted_targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(exhausted, want);
    for run in expected["last_run"].as_array().unwrap() {
        let rule = run["rule"].as_str().unwrap();
        let target = run["target"].as_str().unwrap_or_default();
        assert_eq!(
            ledger
                .rule_last_run(rule, target)
                .map(|t| t.to_string())
                .as_deref(),
            run["ts"].as_str(),
            "{rule}/{target}"
        );
    }
    // The raw MAC the relay woke is written as a target in 0.1.0; the button's firing
    // resolved and is remembered for buttons.
    assert!(
        ledger.has_resolved(
            &entries
                .iter()
                .filter(|e| e.event == Event::Received)
                .filter_map(|e| e.alert.as_ref())
                .find(|a| a.status == AlertStatus::Resolved)
                .unwrap()
                .firing()
        )
    );
}

#[test]
fn a_checkpoint_restores_exactly_the_state_it_was_taken_from() {
    let (entries, _) = fixture();
    let mut ledger = replay(&entries, true);
    // Open runs, a deferred failback, many once-only keys and an exhausted target.
    let plan = |action| Plan {
        rule: "r".into(),
        action,
        target: None,
        dry_run: false,
        cooldown: None,
        origin: crate::vocab::Origin::Rule,
    };
    for i in 0..20_000 {
        let key = RunKey(format!("r|fp{i}|2026-11-22T21:00:00Z|firing"));
        ledger.apply(JournalEntry::run(
            Event::Planned,
            &key,
            &plan(ActionKind::Notify),
            None,
        ));
        if i % 3 != 0 {
            ledger.apply(JournalEntry::run(
                Event::Succeeded,
                &key,
                &plan(ActionKind::Notify),
                None,
            ));
        }
    }
    let alert = AlertRef {
        name: "AistackGpuHostWorkload".into(),
        fingerprint: "f".into(),
        status: AlertStatus::Resolved,
        starts_at: "2026-11-22T21:00:00Z".into(),
        host: Some("gpu-b".into()),
    };
    ledger.apply(
        JournalEntry::run(
            Event::Skipped,
            &RunKey("failback|f|2026-11-22T21:00:00Z|resolved".into()),
            &plan(ActionKind::Failback),
            Some(&alert),
        )
        .because(&Skip::Paused),
    );
    assert!(ledger.deferred_failbacks().next().is_some());
    assert!(ledger.open_runs().count() > 6000);

    let checkpoint = ledger.checkpoint();
    assert!(
        checkpoint.len() > 3,
        "split into parts: {}",
        checkpoint.len()
    );
    for line in &checkpoint {
        assert!(serde_json::to_vec(line).unwrap().len() < 512 * 1024);
    }
    // Through the journal's own format.
    let checkpoint: Vec<JournalEntry> = checkpoint
        .iter()
        .map(|e| serde_json::from_str(&serde_json::to_string(e).unwrap()).unwrap())
        .collect();
    let mut restored = Ledger::new(true);
    for e in &checkpoint {
        restored.apply(e.clone());
    }
    assert_eq!(state(&restored), state(&ledger));
    // The deferred failback keeps the node its re-check asks.
    let deferred = restored.deferred_failbacks().next().unwrap();
    assert_eq!(
        deferred.alert.as_ref().and_then(|a| a.host.as_deref()),
        Some("gpu-b")
    );
    // Read after the files it replaces, it changes nothing either.
    let mut both = ledger.clone();
    for e in &checkpoint {
        both.apply(e.clone());
    }
    assert_eq!(state(&both), state(&ledger));
}

#[test]
fn an_incomplete_checkpoint_counts_for_nothing() {
    let (entries, _) = fixture();
    let ledger = replay(&entries, true);
    let mut checkpoint = Ledger::new(false).checkpoint();
    checkpoint.extend(replay(&entries[..30], true).checkpoint());
    checkpoint.remove(0);
    assert!(checkpoint.len() >= 2, "{}", checkpoint.len());
    checkpoint.pop();
    let mut after = ledger.clone();
    for e in checkpoint {
        after.apply(e);
    }
    assert_eq!(state(&after), state(&ledger));
}

#[test]
fn a_repeat_refused_mid_run_leaves_the_run_open() {
    let mut ledger = Ledger::new(false);
    let key = RunKey("button:failback::fp@2026-11-22T21:00:00Z".into());
    let plan = Plan {
        rule: "manual:button".into(),
        action: ActionKind::Failback,
        target: None,
        dry_run: false,
        cooldown: None,
        origin: crate::vocab::Origin::Button,
    };
    ledger.apply(JournalEntry::run(Event::Planned, &key, &plan, None));
    ledger.apply(JournalEntry::run(Event::Started, &key, &plan, None));
    for skip in [Skip::AlreadyDone, Skip::Duplicate] {
        ledger.apply(JournalEntry::run(Event::Skipped, &key, &plan, None).because(&skip));
        assert_eq!(ledger.open_runs().count(), 1, "{skip:?}");
    }
    // A skip at action time ends it; the wording is irrelevant, the tag decides.
    let gone = JournalEntry::run(Event::Skipped, &key, &plan, None)
        .because(&Skip::ConditionGone("vLLM is not healthy".into()))
        .with_detail("reworded");
    ledger.apply(gone);
    assert_eq!(ledger.open_runs().count(), 0);
    assert!(ledger.ran(&key));
}

#[test]
fn relayed_wakes_leave_no_state_behind() {
    let mut ledger = Ledger::new(false);
    let plan = Plan {
        rule: "manual:wake-relay".into(),
        action: ActionKind::Wake,
        target: None,
        dry_run: false,
        cooldown: None,
        origin: crate::vocab::Origin::Relay,
    };
    for n in 0..10_000 {
        let key = RunKey::manual(Timestamp::now(), n);
        ledger.apply(JournalEntry::run(Event::Planned, &key, &plan, None));
        ledger.apply(JournalEntry::run(Event::Succeeded, &key, &plan, None));
    }
    assert_eq!(ledger.remembered(), 0, "manual runs are not once-only keys");
    assert!(ledger.action_runs.is_empty() && ledger.rule_runs.is_empty());
    assert_eq!(ledger.recent().len(), RECENT_CAPACITY);
}

#[test]
fn the_once_only_set_forgets_the_oldest_first() {
    let mut ledger = Ledger::new(false);
    let plan = Plan {
        rule: "r".into(),
        action: ActionKind::Notify,
        target: None,
        dry_run: true,
        cooldown: None,
        origin: crate::vocab::Origin::Rule,
    };
    let key = |i: usize| RunKey(format!("r|{i}|t|firing"));
    for i in 0..DEDUPE_CAPACITY + 10 {
        ledger.apply(JournalEntry::run(Event::Planned, &key(i), &plan, None));
        ledger.apply(JournalEntry::run(Event::Succeeded, &key(i), &plan, None));
    }
    assert_eq!(ledger.remembered(), DEDUPE_CAPACITY);
    assert!(!ledger.ran(&key(5)));
    assert!(ledger.ran(&key(DEDUPE_CAPACITY + 9)));
}

#[test]
fn the_last_suspend_that_asked_logind_is_remembered_with_the_hosts_awake_time() {
    let mut ledger = Ledger::new(false);
    let plan = Plan {
        rule: "s".into(),
        action: ActionKind::Suspend,
        target: Some("gpu-box".into()),
        dry_run: false,
        cooldown: Some(Duration::from_secs(60)),
        origin: crate::vocab::Origin::Rule,
    };
    let run = |ledger: &mut Ledger, key: &str, end: JournalEntry| {
        let key = RunKey(key.into());
        ledger.apply(JournalEntry::run(Event::Planned, &key, &plan, None));
        let stamp = AwakeStamp::now();
        ledger.apply(JournalEntry {
            awake: Some(stamp.clone()),
            ..JournalEntry::run(Event::Started, &key, &plan, None)
        });
        ledger.apply(JournalEntry {
            key: Some(key),
            ..end
        });
        stamp
    };
    let entry = |event| JournalEntry::run(event, &RunKey(String::new()), &plan, None);
    // Stopped by a re-check, or failing before logind slept: no grace.
    run(
        &mut ledger,
        "a",
        entry(Event::Skipped).because(&Skip::ConditionGone("inhibitor".into())),
    );
    run(
        &mut ledger,
        "b",
        JournalEntry {
            reason: Some(Reason::Error),
            ..entry(Event::Failed)
        },
    );
    assert_eq!(ledger.last_suspend(), None);
    // Asked logind, or may have: the grace counts from its start.
    let stamp = run(&mut ledger, "c", entry(Event::Succeeded));
    assert_eq!(ledger.last_suspend(), Some(&stamp));
    let stamp = run(
        &mut ledger,
        "d",
        JournalEntry {
            reason: Some(Reason::Interrupted),
            ..entry(Event::Failed)
        },
    );
    assert_eq!(ledger.last_suspend(), Some(&stamp));
    let restored = replay(&ledger.checkpoint(), false);
    assert_eq!(
        restored.last_suspend(),
        Some(&stamp),
        "kept across a rotation"
    );
}

/// A pair per GPU node: each node's backend, and the failback a pause held back on each,
/// are their own, and survive a checkpoint.
#[test]
fn each_gpu_nodes_pair_keeps_its_own_backend_and_deferred_failback() {
    let on = |action, node: &str| Plan {
        rule: "r".into(),
        action,
        target: Some(node.to_owned()),
        dry_run: false,
        cooldown: None,
        origin: crate::vocab::Origin::Rule,
    };
    let alert = |node: &str, status| AlertRef {
        name: "AistackGpuHostWorkload".into(),
        fingerprint: format!("f-{node}"),
        status,
        starts_at: "2026-12-07T20:00:00Z".into(),
        host: Some(node.to_owned()),
    };
    let mut ledger = Ledger::new(false);
    for node in ["gpu-a", "gpu-b"] {
        let key = RunKey(format!("failover|f-{node}|2026-12-07T20:00:00Z|firing"));
        let run = on(ActionKind::Failover, node);
        let about = alert(node, AlertStatus::Firing);
        ledger.apply(JournalEntry::run(Event::Planned, &key, &run, Some(&about)));
        assert!(ledger.backend_moving(node));
        assert!(!ledger.backend_moving(""), "the one pair is not moving");
        ledger.apply(JournalEntry::run(Event::Started, &key, &run, Some(&about)));
        ledger.apply(JournalEntry::run(
            Event::Succeeded,
            &key,
            &run,
            Some(&about),
        ));
    }
    assert_eq!(ledger.backend("gpu-a").0, Backend::Fallback);
    assert_eq!(ledger.backend("gpu-b").0, Backend::Fallback);
    assert_eq!(
        ledger.backend("").0,
        Backend::Primary,
        "the one pair never moved"
    );
    // Paused: A's game ends (its failback is held back); B's fails back by hand.
    ledger.apply(JournalEntry::new(Event::Paused));
    let resolved = alert("gpu-a", AlertStatus::Resolved);
    ledger.apply(
        JournalEntry::run(
            Event::Skipped,
            &RunKey("failback|f-gpu-a|2026-12-07T20:00:00Z|resolved".into()),
            &on(ActionKind::Failback, "gpu-a"),
            Some(&resolved),
        )
        .because(&Skip::Paused),
    );
    // A dry-run rule on the same resolution does not replace the real one.
    let dry = Plan {
        dry_run: true,
        ..on(ActionKind::Failback, "gpu-a")
    };
    ledger.apply(
        JournalEntry::run(
            Event::Skipped,
            &RunKey("dry-failback|f-gpu-a|2026-12-07T20:00:00Z|resolved".into()),
            &dry,
            Some(&resolved),
        )
        .because(&Skip::Paused),
    );
    assert!(
        ledger.deferred_failbacks().all(|e| !e.dry_run),
        "{:?}",
        ledger.deferred_failbacks().collect::<Vec<_>>()
    );
    let key = RunKey("manual:api:1".into());
    let back = on(ActionKind::Failback, "gpu-b");
    ledger.apply(JournalEntry::run(Event::Planned, &key, &back, None));
    ledger.apply(JournalEntry::run(Event::Succeeded, &key, &back, None));
    assert_eq!(ledger.backend("gpu-b").0, Backend::Primary);
    assert_eq!(ledger.backend("gpu-a").0, Backend::Fallback);
    let deferred: Vec<_> = ledger
        .deferred_failbacks()
        .map(|e| e.target.clone())
        .collect();
    assert_eq!(
        deferred,
        [Some("gpu-a".to_owned())],
        "B's run decided B only"
    );

    let checkpoint: Vec<JournalEntry> = ledger
        .checkpoint()
        .iter()
        .map(|e| serde_json::from_str(&serde_json::to_string(e).unwrap()).unwrap())
        .collect();
    let mut restored = Ledger::new(false);
    for e in checkpoint {
        restored.apply(e);
    }
    assert_eq!(state(&restored), state(&ledger));
    assert_eq!(restored.backend("gpu-a"), ledger.backend("gpu-a"));
}
