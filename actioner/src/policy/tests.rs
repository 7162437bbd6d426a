//! Every check of the policy, for every origin, against ledgers built from journal entries.

use std::collections::BTreeMap;

use aistack_common::config::parse;

use super::*;
use crate::alert::AlertStatus;
use crate::config::Config;
use crate::journal::{AlertRef, Event, JournalEntry};
use crate::vocab::Timestamp;

const CONFIG: &str = r#"
host: gpu-box
rules:
  - {name: suspend, match: {alertname: AistackHostIdle}, action: suspend, cooldown: 30m}
  - {name: repair, match: {alertname: AistackContainerUnhealthy}, action: repair, target_label: container}
  - {name: wake-nas, match: {alertname: NasNeeded}, action: wake, target: nas, cooldown: 1h}
  - {name: failback, match: {alertname: AistackGpuHostWorkload}, on: resolved, action: failback}
  - {name: dry, match: {alertname: Dry}, action: wake, target: nas, dry_run: true}
actions:
  wake: {targets: {nas: {mac: "aa:bb:cc:dd:ee:ff"}}}
  repair: {docker: {containers: [ollama]}, max_attempts: 2, window: 1h}
  failover: {docker: {primary: vllm, fallback: ollama}}
"#;

fn policy() -> Policy {
    let config: Config = parse(CONFIG).unwrap_or_else(|p| panic!("{p:?}"));
    Policy::new(
        RuleSet::new(&config).unwrap(),
        RepairBudget {
            max_attempts: 2,
            window: Duration::from_secs(3600),
        },
    )
}

fn alert(name: &str, fingerprint: &str, labels: &[(&str, &str)]) -> Alert {
    let mut alert = Alert {
        status: AlertStatus::Firing,
        labels: BTreeMap::from([("alertname".to_owned(), name.to_owned())]),
        annotations: BTreeMap::new(),
        starts_at: "2026-11-22T21:00:00Z".into(),
        ends_at: String::new(),
        generator_url: String::new(),
        fingerprint: fingerprint.into(),
    };
    for (k, v) in labels {
        alert.labels.insert((*k).into(), (*v).into());
    }
    alert
}

/// What the recorder would journal for `verdicts` that went through.
fn commit(ledger: &mut Ledger, verdicts: &[(RunKey, Plan, Verdict)], at: SystemTime) {
    for (key, plan, verdict) in verdicts {
        if verdict.is_ok() {
            ledger.apply(JournalEntry {
                ts: Timestamp(at),
                ..JournalEntry::run(Event::Planned, key, plan, None)
            });
        }
    }
}

fn verdicts(v: &[(RunKey, Plan, Verdict)]) -> Vec<Verdict> {
    v.iter().map(|(_, _, verdict)| verdict.clone()).collect()
}

#[test]
fn a_firing_runs_a_rule_once() {
    let policy = policy();
    let mut ledger = Ledger::new(false);
    let now = SystemTime::now();
    let idle = alert("AistackHostIdle", "f1", &[("instance", "gpu-box:9470")]);
    let first = policy.for_alert(&ledger, &Tentative::default(), &idle, now);
    assert_eq!(verdicts(&first), [Ok(())]);
    // Twice in the batch that plans it, then after it is on disk.
    let mut batch = Tentative::default();
    batch.planned(&first[0].0, &first[0].1);
    assert_eq!(
        verdicts(&policy.for_alert(&ledger, &batch, &idle, now)),
        [Err(Skip::Duplicate)]
    );
    commit(&mut ledger, &first, now);
    assert_eq!(
        verdicts(&policy.for_alert(&ledger, &Tentative::default(), &idle, now)),
        [Err(Skip::Duplicate)]
    );
}

#[test]
fn a_new_firing_waits_out_its_rules_cooldown_per_target() {
    let policy = policy();
    let mut ledger = Ledger::new(false);
    let t0 = SystemTime::now();
    let first = policy.for_alert(
        &ledger,
        &Tentative::default(),
        &alert("NasNeeded", "a", &[]),
        t0,
    );
    commit(&mut ledger, &first, t0);
    let again = alert("NasNeeded", "b", &[]);
    let later = t0 + Duration::from_secs(600);
    assert_eq!(
        verdicts(&policy.for_alert(&ledger, &Tentative::default(), &again, later)),
        [Err(Skip::Cooldown(Duration::from_secs(3000)))]
    );
    assert_eq!(
        verdicts(&policy.for_alert(
            &ledger,
            &Tentative::default(),
            &again,
            t0 + Duration::from_secs(3601)
        )),
        [Ok(())]
    );
}

#[test]
fn pause_holds_rules_and_people_but_not_a_persons_dry_run_or_the_relay() {
    let policy = policy();
    let mut ledger = Ledger::new(false);
    ledger.apply(JournalEntry::new(Event::Paused));
    let now = SystemTime::now();
    let idle = alert("AistackHostIdle", "f", &[("host", "gpu-box")]);
    assert_eq!(
        verdicts(&policy.for_alert(&ledger, &Tentative::default(), &idle, now)),
        [Err(Skip::Paused)]
    );
    // A rule's dry run is automatic too: held as well (and a failback held is kept for the
    // resume).
    assert_eq!(
        verdicts(&policy.for_alert(&ledger, &Tentative::default(), &alert("Dry", "d", &[]), now)),
        [Err(Skip::Paused)]
    );
    let key = RunKey::manual(Timestamp::now(), 1);
    let wake = |origin, dry_run| Request {
        action: ActionKind::Wake,
        target: Some("nas".into()),
        dry_run,
        origin,
        once: None,
    };
    let judge = |r: &Request| {
        policy
            .for_request(&ledger, &Tentative::default(), r, &key, now)
            .1
    };
    assert_eq!(judge(&wake(Origin::Api, false)), Err(Skip::Paused));
    assert_eq!(judge(&wake(Origin::Button, false)), Err(Skip::Paused));
    assert_eq!(judge(&wake(Origin::Api, true)), Ok(()));
    assert_eq!(judge(&wake(Origin::Relay, false)), Ok(()));
}

#[test]
fn people_name_allowlisted_targets_and_wait_out_the_actions_longest_cooldown() {
    let policy = policy();
    let mut ledger = Ledger::new(false);
    let now = SystemTime::now();
    let request = |target: Option<&str>| Request {
        action: ActionKind::Wake,
        target: target.map(Into::into),
        dry_run: false,
        origin: Origin::Api,
        once: None,
    };
    let key = RunKey::manual(Timestamp::now(), 1);
    let judge = |ledger: &Ledger, r: &Request| {
        policy.for_request(ledger, &Tentative::default(), r, &key, now)
    };
    assert_eq!(
        judge(&ledger, &request(None)).1,
        Err(Skip::NoTarget(ActionKind::Wake))
    );
    assert_eq!(
        judge(&ledger, &request(Some("printer"))).1,
        Err(Skip::NotAllowlisted(ActionKind::Wake, "printer".into()))
    );
    let (plan, verdict) = judge(&ledger, &request(Some("nas")));
    assert_eq!(verdict, Ok(()));
    ledger.apply(JournalEntry {
        ts: Timestamp(now),
        ..JournalEntry::run(Event::Planned, &key, &plan, None)
    });
    // The longest wake rule cooldown (1h), on this target, whoever ran it.
    assert_eq!(
        judge(&ledger, &request(Some("nas"))).1,
        Err(Skip::Cooldown(Duration::from_secs(3600)))
    );
    // A relayed raw MAC has no target to hold a cooldown for.
    let raw = Request {
        target: None,
        origin: Origin::Relay,
        ..request(None)
    };
    assert_eq!(judge(&ledger, &raw).1, Ok(()));
}

#[test]
fn repairs_stop_at_the_budget_for_rules_only() {
    let policy = policy();
    let mut ledger = Ledger::new(false);
    let now = SystemTime::now();
    let unhealthy = |fp: &str| alert("AistackContainerUnhealthy", fp, &[("container", "ollama")]);
    for fp in ["a", "b"] {
        let v = policy.for_alert(&ledger, &Tentative::default(), &unhealthy(fp), now);
        assert_eq!(verdicts(&v), [Ok(())]);
        commit(&mut ledger, &v, now);
    }
    assert_eq!(
        verdicts(&policy.for_alert(&ledger, &Tentative::default(), &unhealthy("c"), now)),
        [Err(Skip::Exhausted {
            attempts: 2,
            window: Duration::from_secs(3600)
        })]
    );
    let person = Request {
        action: ActionKind::Repair,
        target: Some("ollama".into()),
        dry_run: false,
        origin: Origin::Api,
        once: None,
    };
    let key = RunKey::manual(Timestamp::now(), 9);
    assert_eq!(
        policy
            .for_request(&ledger, &Tentative::default(), &person, &key, now)
            .1,
        Ok(())
    );
    // The budget comes back when the window has passed the oldest repairs.
    let snapshot = policy.snapshot(&ledger, now, None);
    assert!(
        snapshot.exhausted.is_empty(),
        "not exhausted until a skip says so"
    );
    let later = now + Duration::from_secs(3601);
    assert_eq!(
        verdicts(&policy.for_alert(&ledger, &Tentative::default(), &unhealthy("d"), later)),
        [Ok(())]
    );
}

#[test]
fn a_button_runs_once_and_not_after_its_alert_resolved() {
    let policy = policy();
    let mut ledger = Ledger::new(true);
    let now = SystemTime::now();
    let firing = "fp@2026-11-22T21:00:00Z".to_owned();
    let press = Request {
        action: ActionKind::Failback,
        target: None,
        dry_run: false,
        origin: Origin::Button,
        once: Some(Once {
            key: RunKey::button(ActionKind::Failback, None, &firing),
            firing: firing.clone(),
        }),
    };
    let key = press.once.clone().unwrap().key;
    let (plan, verdict) = policy.for_request(&ledger, &Tentative::default(), &press, &key, now);
    assert_eq!(verdict, Ok(()));
    let mut batch = Tentative::default();
    batch.planned(&key, &plan);
    assert_eq!(
        policy.for_request(&ledger, &batch, &press, &key, now).1,
        Err(Skip::AlreadyDone)
    );
    // Another button about the same firing, once it resolved.
    let other = Request {
        action: ActionKind::Wake,
        target: Some("nas".into()),
        once: Some(Once {
            key: RunKey::button(ActionKind::Wake, Some("nas"), &firing),
            firing: firing.clone(),
        }),
        ..press.clone()
    };
    ledger.apply(JournalEntry {
        alert: Some(AlertRef {
            name: "A".into(),
            fingerprint: "fp".into(),
            status: AlertStatus::Resolved,
            starts_at: "2026-11-22T21:00:00Z".into(),
            host: None,
        }),
        ..JournalEntry::new(Event::Received)
    });
    let other_key = other.once.clone().unwrap().key;
    assert_eq!(
        policy
            .for_request(&ledger, &Tentative::default(), &other, &other_key, now)
            .1,
        Err(Skip::Resolved)
    );
}

/// With a pair per GPU node, a person's failback names the node as the config does, however
/// it is spelt (capitals, a trailing dot, another way to write an IPv6 address); a node
/// without a pair, or none at all, is refused.
#[test]
fn a_persons_failback_names_its_node_as_the_config_does() {
    let config: Config = parse(
        r#"
exporter_url: "http://{node}:9470"
actions:
  failover:
    platform: kubernetes
    nodes:
      gpu-b:
        kubernetes: {namespace: ml, primary: vllm-b, fallback: ollama-b, service: inference-b}
        primary_health_url: "http://vllm-b.ml.svc:8000/health"
        fallback_health_url: "http://ollama-b.ml.svc:11434/api/tags"
      "fd00::7":
        kubernetes: {namespace: ml, primary: vllm-c, fallback: ollama-c, service: inference-c}
        primary_health_url: "http://vllm-c.ml.svc:8000/health"
        fallback_health_url: "http://ollama-c.ml.svc:11434/api/tags"
"#,
    )
    .unwrap_or_else(|p| panic!("{p:?}"));
    let policy = Policy::new(
        RuleSet::new(&config).unwrap(),
        RepairBudget {
            max_attempts: 2,
            window: Duration::from_secs(3600),
        },
    );
    let ledger = Ledger::new(false);
    let ask = |target: Option<&str>| {
        let request = Request {
            action: ActionKind::Failback,
            target: target.map(str::to_owned),
            dry_run: false,
            origin: Origin::Api,
            once: None,
        };
        let key = RunKey::manual(Timestamp::now(), 1);
        policy.for_request(
            &ledger,
            &Tentative::default(),
            &request,
            &key,
            SystemTime::now(),
        )
    };
    for (spelt, configured) in [("GPU-B.", "gpu-b"), ("fd00:0:0::7", "fd00::7")] {
        let (plan, verdict) = ask(Some(spelt));
        assert_eq!(verdict, Ok(()), "{spelt}");
        assert_eq!(plan.target.as_deref(), Some(configured));
    }
    assert!(matches!(
        ask(Some("gpu-c")).1,
        Err(Skip::NotAllowlisted(..))
    ));
    assert!(matches!(ask(None).1, Err(Skip::NoTarget(_))));
}
