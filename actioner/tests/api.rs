//! The actioner's API and safety rules, through its router (tower `oneshot`), with a real
//! journal in a temporary state directory and the real wake action on loopback.

use std::net::UdpSocket;
use std::time::Duration;

use aistack_actioner::auth::Auth;
use aistack_actioner::config::Config;
use aistack_actioner::journal::{Event, Journal, JournalEntry, JournalLimits};
use aistack_actioner::vocab::{ActionKind, Reason};
use aistack_actioner::{Actioner, build_actions};
use axum::Router;
use axum::http::StatusCode;

mod support;
use support::{
    DOCKER_FAILOVER, GAMING_DRY_RULES, GAMING_RULES, TOKEN, alert, api, call, failed_over_before,
    read_journal, stand_ins, webhook,
};

struct Setup {
    dir: tempfile::TempDir,
    udp: UdpSocket,
}

impl Setup {
    fn new() -> Self {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Self {
            dir: tempfile::tempdir().unwrap(),
            udp,
        }
    }

    fn config(&self, extra_rules: &str) -> Config {
        self.config_with(extra_rules, "")
    }

    /// With `extra_actions` under `actions:` (indented two spaces).
    fn config_with(&self, extra_rules: &str, extra_actions: &str) -> Config {
        let port = self.udp.local_addr().unwrap().port();
        let yaml = format!(
            r#"
host: gpu-box
state_dir: {state}
auth: {{bearer_token_file: /dev/null}}
rules:
  - {{name: wake-nas, match: {{alertname: NasNeeded}}, action: wake, target: nas, cooldown: 1h}}
  - {{name: wake-host, match: {{alertname: WakeHost}}, action: wake}}
  - {{name: dry, match: {{alertname: DryRun}}, action: wake, target: nas, dry_run: true}}
{extra_rules}
actions:
  wake:
    targets:
      nas: {{mac: "aa:bb:cc:dd:ee:ff", broadcast: 127.0.0.1, port: {port}}}
      gpu-box: {{mac: "aa:bb:cc:dd:ee:01", broadcast: 127.0.0.1, port: {port}}}
      secure: {{mac: "aa:bb:cc:dd:ee:02", broadcast: 127.0.0.1, port: {port}, secureon: "01:02:03:04:05:06"}}
{extra_actions}
"#,
            state = self.dir.path().join("state").display(),
        );
        aistack_common::config::parse(&yaml).unwrap_or_else(|p| panic!("{p:?}"))
    }

    fn start(&self, extra_rules: &str) -> Actioner {
        let config = self.config(extra_rules);
        let actions = build_actions(&config).unwrap();
        Actioner::start(
            &config,
            Auth::from_secrets(TOKEN, Some(("am", "pw")), Some("relay-key")),
            actions,
        )
        .unwrap()
    }

    fn packets(&self) -> usize {
        self.udp.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 256];
        let mut n = 0;
        while self.udp.recv_from(&mut buf).is_ok() {
            n += 1;
        }
        self.udp.set_nonblocking(false).unwrap();
        n
    }

    fn journal(&self) -> Vec<JournalEntry> {
        read_journal(&self.dir.path().join("state"))
    }
}

async fn post_alerts(router: &Router, body: String) -> (StatusCode, serde_json::Value) {
    api(router, "POST", "/api/v1/alerts", body).await
}

/// Waits until the journal holds an entry of `event` for a key containing `key`.
async fn settled(setup: &Setup, key: &str, event: Event) -> Vec<JournalEntry> {
    for _ in 0..100 {
        let journal = setup.journal();
        if journal
            .iter()
            .any(|e| e.event == event && e.key.as_deref().is_some_and(|k| k.contains(key)))
        {
            return journal;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no {event:?} for {key}: {:#?}", setup.journal());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firing_runs_once_across_resends_ha_duplicates_and_restarts() {
    let setup = Setup::new();
    let actioner = setup.start("");
    let body = webhook(&alert(
        "NasNeeded",
        "f1",
        "2026-11-22T21:00:00.5Z",
        "firing",
    ));
    let (status, json) = post_alerts(&actioner.router, body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(
        (json["received"].as_u64(), json["planned"].as_u64()),
        (Some(1), Some(1))
    );
    let journal = settled(&setup, "wake-nas|f1", Event::Succeeded).await;
    let events: Vec<Event> = journal.iter().map(|e| e.event).collect();
    assert_eq!(
        events,
        [
            Event::Received,
            Event::Planned,
            Event::Started,
            Event::Succeeded
        ]
    );
    assert_eq!(setup.packets(), 1);

    // Alertmanager re-sends (repeat_interval) and its HA peer sends the same, at once.
    let (a, b) = tokio::join!(
        post_alerts(&actioner.router, body.clone()),
        post_alerts(&actioner.router, body.clone())
    );
    assert_eq!((a.0, b.0), (StatusCode::OK, StatusCode::OK));
    assert_eq!(
        (a.1["planned"].as_u64(), b.1["planned"].as_u64()),
        (Some(0), Some(0))
    );

    // A restart in between changes nothing.
    drop(actioner);
    let actioner = setup.start("");
    let (status, json) = post_alerts(&actioner.router, body).await;
    assert_eq!(
        (status, json["planned"].as_u64()),
        (StatusCode::OK, Some(0))
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(setup.packets(), 0, "nothing ran twice");
    let duplicates = setup
        .journal()
        .iter()
        .filter(|e| {
            e.detail
                .as_deref()
                .is_some_and(|d| d.starts_with("duplicate"))
        })
        .count();
    assert_eq!(duplicates, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_firing_of_the_same_alert_respects_the_cooldown() {
    let setup = Setup::new();
    let actioner = setup.start("");
    post_alerts(
        &actioner.router,
        webhook(&alert("NasNeeded", "f1", "2026-11-22T21:00:00Z", "firing")),
    )
    .await;
    settled(&setup, "wake-nas|f1", Event::Succeeded).await;
    // It resolved and fired again: a new startsAt, a new firing, but within the 1 h cooldown.
    let (status, json) = post_alerts(
        &actioner.router,
        webhook(&alert("NasNeeded", "f1", "2026-11-22T21:05:00Z", "firing")),
    )
    .await;
    assert_eq!(
        (status, json["planned"].as_u64()),
        (StatusCode::OK, Some(0))
    );
    let journal = setup.journal();
    let skipped = journal.iter().find(|e| e.event == Event::Skipped).unwrap();
    assert!(
        skipped.detail.as_deref().unwrap().starts_with("cooldown: "),
        "{skipped:?}"
    );
    let (_, state) = api(&actioner.router, "GET", "/api/v1/state", String::new()).await;
    assert!(
        state["cooldowns"]["wake-nas/nas"].as_u64().unwrap() > 3500,
        "{state}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_alert_is_judged_on_its_own_labels() {
    let setup = Setup::new();
    let actioner = setup.start("");
    // One group: a wake for this host (allowlisted) and for an unknown host (not).
    let mut evil = alert("WakeHost", "f2", "2026-11-22T21:00:00Z", "firing");
    evil = evil.replace("gpu-box:9470", "attacker:9470");
    let body = webhook(&format!(
        "{},{evil}",
        alert("WakeHost", "f1", "2026-11-22T21:00:00Z", "firing")
    ));
    let (status, json) = post_alerts(&actioner.router, body).await;
    assert_eq!(
        (status, json["planned"].as_u64()),
        (StatusCode::OK, Some(1))
    );
    let journal = settled(&setup, "wake-host|f1", Event::Succeeded).await;
    let refused = journal.iter().find(|e| e.event == Event::Skipped).unwrap();
    assert_eq!(refused.reason, Some(Reason::NotAllowlisted));
    assert_eq!(
        refused.detail.as_deref(),
        Some("\"attacker\" is not in the wake allowlist")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_runs_pause_and_manual_triggers() {
    let setup = Setup::new();
    let actioner = setup.start("");
    post_alerts(
        &actioner.router,
        webhook(&alert("DryRun", "d1", "2026-11-22T21:00:00Z", "firing")),
    )
    .await;
    let journal = settled(&setup, "dry|d1", Event::Skipped).await;
    let dry = journal.iter().find(|e| e.event == Event::Skipped).unwrap();
    assert!(
        dry.detail
            .as_deref()
            .unwrap()
            .starts_with("dry-run: would send a magic packet for aa:bb:cc:dd:ee:ff"),
        "{dry:?}"
    );
    assert!(dry.dry_run);
    assert_eq!(setup.packets(), 0);

    let (status, _) = api(&actioner.router, "POST", "/api/v1/pause", String::new()).await;
    assert_eq!(status, StatusCode::OK);
    let (_, json) = post_alerts(
        &actioner.router,
        webhook(&alert("WakeHost", "p1", "2026-11-22T21:00:00Z", "firing")),
    )
    .await;
    assert_eq!(json["planned"].as_u64(), Some(0));
    let (status, json) = api(
        &actioner.router,
        "POST",
        "/api/v1/actions/wake",
        r#"{"target":"gpu-box"}"#,
    )
    .await;
    assert_eq!(
        (status, json["error"].as_str()),
        (StatusCode::CONFLICT, Some("paused"))
    );
    // The relay is a person asking for a host, not an automatic action: pause lets it through.
    let (status, json) = call(
        &actioner.router,
        "POST",
        "/api/v1/wake",
        None,
        Some("application/json"),
        r#"{"target":"nas","key":"relay-key"}"#.into(),
    )
    .await;
    assert_eq!(
        (status, json["status"].as_str()),
        (StatusCode::OK, Some("ok")),
        "{json}"
    );
    assert_eq!(setup.packets(), 1);
    let (_, state) = api(&actioner.router, "GET", "/api/v1/state", String::new()).await;
    assert_eq!(state["paused"], true);
    api(&actioner.router, "POST", "/api/v1/resume", String::new()).await;

    let (status, json) = api(
        &actioner.router,
        "POST",
        "/api/v1/actions/wake",
        r#"{"target":"gpu-box"}"#,
    )
    .await;
    assert_eq!(
        (status, json["status"].as_str()),
        (StatusCode::OK, Some("succeeded")),
        "{json}"
    );
    assert_eq!(setup.packets(), 1);
    let (status, json) = api(
        &actioner.router,
        "POST",
        "/api/v1/actions/wake",
        r#"{"target":"nas","dry_run":true}"#,
    )
    .await;
    assert_eq!(
        (status, json["status"].as_str()),
        (StatusCode::OK, Some("dry_run")),
        "{json}"
    );
    let (status, _) = api(
        &actioner.router,
        "POST",
        "/api/v1/actions/wake",
        r#"{"target":"router"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = api(
        &actioner.router,
        "POST",
        "/api/v1/actions/reboot",
        String::new(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Actions this build cannot run yet are journaled as failed, not pretended.
    let (status, json) = api(
        &actioner.router,
        "POST",
        "/api/v1/actions/failover",
        String::new(),
    )
    .await;
    assert_eq!(
        (status, json["status"].as_str()),
        (StatusCode::OK, Some("failed")),
        "{json}"
    );

    let (_, tail) = api(
        &actioner.router,
        "GET",
        "/api/v1/actions?limit=3",
        String::new(),
    )
    .await;
    let tail = tail.as_array().unwrap();
    assert_eq!(tail.len(), 3);
    assert!(
        tail[0]["seq"].as_u64() > tail[1]["seq"].as_u64(),
        "newest first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_4xx_and_nothing_happens() {
    let setup = Setup::new();
    let actioner = setup.start("");
    let r = &actioner.router;
    let good = webhook(&alert("WakeHost", "x1", "2026-11-22T21:00:00Z", "firing"));
    let json = Some("application/json");
    assert_eq!(
        call(r, "POST", "/api/v1/alerts", None, json, good.clone())
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(
            r,
            "POST",
            "/api/v1/alerts",
            Some("Bearer wrong"),
            json,
            good.clone()
        )
        .await
        .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(
            r,
            "POST",
            "/api/v1/alerts",
            Some("Basic YW06cHc="),
            json,
            good.clone()
        )
        .await
        .0,
        StatusCode::OK,
        "Basic am:pw"
    );
    assert_eq!(
        call(
            r,
            "POST",
            "/api/v1/alerts",
            Some(&format!("Bearer {TOKEN}")),
            Some("text/plain"),
            good.clone()
        )
        .await
        .0,
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    for bad in [
        "{",
        "null",
        r#"{"version":"3","alerts":[]}"#,
        r#"{"version":"4","alerts":"none"}"#,
        &good[..good.len() / 2],
    ] {
        let (status, json) = post_alerts(r, bad.to_owned()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(json["error"].is_string());
    }
    let huge = webhook(&alert(
        "WakeHost",
        &"f".repeat(2 << 20),
        "2026-11-22T21:00:00Z",
        "firing",
    ));
    assert_eq!(post_alerts(r, huge).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        call(r, "GET", "/api/v1/state", None, None, String::new())
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    // The relay: a wrong key is 403, a bad MAC 400.
    let (status, _) = call(
        r,
        "POST",
        "/api/v1/wake",
        None,
        json,
        r#"{"target":"nas","key":"nope"}"#.into(),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = call(
        r,
        "POST",
        "/api/v1/wake",
        None,
        json,
        r#"{"mac":"zz:zz","key":"relay-key"}"#.into(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = call(
        r,
        "POST",
        "/api/v1/wake",
        None,
        json,
        r#"{"target":"router","key":"relay-key"}"#.into(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(setup.packets(), 1, "only the authenticated webhook acted");
    let (status, json) = call(
        r,
        "POST",
        "/api/v1/wake",
        None,
        json,
        r#"{"target":"nas","key":"relay-key"}"#.into(),
    )
    .await;
    assert_eq!(
        (status, json["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    assert_eq!(setup.packets(), 1);
    let text = {
        let mut t = String::new();
        prometheus_client::encoding::text::encode(&mut t, &actioner.metrics.registry).unwrap();
        t
    };
    assert!(
        text.contains(r#"aistack_actioner_webhooks_total{code="401"} 2"#),
        "{text}"
    );
    assert!(
        text.contains(r#"aistack_actioner_webhooks_total{code="413"} 1"#),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_interrupted_by_a_crash_is_failed_and_not_retried() {
    let setup = Setup::new();
    // A previous process journaled "started" and died.
    let (mut journal, _) = Journal::open(
        &setup.dir.path().join("state"),
        JournalLimits::default(),
        drop,
    )
    .unwrap();
    let key = "wake-nas|f9|2026-11-22T21:00:00Z|firing";
    let mut started = JournalEntry {
        key: Some(key.into()),
        rule: Some("wake-nas".into()),
        action: Some(ActionKind::Wake),
        target: Some("nas".into()),
        ..JournalEntry::new(Event::Planned)
    };
    let mut again = started.clone();
    again.event = Event::Started;
    journal.append(&mut [started.clone(), again]).unwrap();
    started.event = Event::Started;
    drop(journal);

    let actioner = setup.start("");
    let journal = setup.journal();
    let last = journal.last().unwrap();
    assert_eq!(
        (last.event, last.key.as_deref()),
        (Event::Failed, Some(key))
    );
    assert!(
        last.detail.as_deref().unwrap().starts_with("interrupted"),
        "{last:?}"
    );
    let (_, json) = post_alerts(
        &actioner.router,
        webhook(&alert("NasNeeded", "f9", "2026-11-22T21:00:00Z", "firing")),
    )
    .await;
    assert_eq!(json["planned"].as_u64(), Some(0), "not silently retried");
    assert_eq!(setup.packets(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secureon_password_follows_the_sixteen_macs() {
    let setup = Setup::new();
    let actioner = setup.start("");
    let (status, json) = api(
        &actioner.router,
        "POST",
        "/api/v1/actions/wake",
        r#"{"target":"secure"}"#,
    )
    .await;
    assert_eq!(
        (status, json["status"].as_str()),
        (StatusCode::OK, Some("succeeded")),
        "{json}"
    );
    let mut buf = [0u8; 256];
    let (n, _) = setup.udp.recv_from(&mut buf).unwrap();
    assert_eq!(n, 6 + 16 * 6 + 6);
    assert_eq!(&buf[102..108], &[1, 2, 3, 4, 5, 6]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_dry_run_holds_for_manual_triggers_too() {
    let setup = Setup::new();
    let mut config = setup.config("");
    config.dry_run = true;
    let actioner = support::start(&config);
    let (status, body) = api(
        &actioner.router,
        "POST",
        "/api/v1/actions/wake",
        r#"{"target":"nas"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "dry_run", "{body}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(setup.packets(), 0, "a dry run sent a packet");
    let planned = setup
        .journal()
        .into_iter()
        .find(|e| e.event == Event::Planned)
        .unwrap();
    assert!(planned.dry_run, "{planned:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_button_waits_out_a_pause_runs_once_and_not_after_its_alert_resolved() {
    use aistack_actioner::actions::notify::buttons::Buttons;
    use aistack_actioner::alert::Alert;

    let setup = Setup::new();
    let key_file = setup.dir.path().join("buttons.key");
    std::fs::write(&key_file, "ab".repeat(32)).unwrap();
    let config = setup.config_with(
        "",
        &format!(
            r#"  notify:
    ntfy: {{url: "http://127.0.0.1:9", topic: t}}
    buttons:
      url: "http://phone-reachable.example"
      key_file: {}
      offer: [{{match: {{alertname: NasAsleep}}, label: "Wake {{target}}", action: wake, target: nas}}]"#,
            key_file.display()
        ),
    );
    let buttons = Buttons::new(
        config.actions.notify.buttons.as_ref().unwrap(),
        config.allowlists(),
    )
    .unwrap();
    let press_path = |fingerprint: &str| {
        let alert: Alert = serde_json::from_str(&alert(
            "NasAsleep",
            fingerprint,
            "2026-11-22T21:00:00Z",
            "firing",
        ))
        .unwrap();
        let offered = buttons.for_alert(&alert, std::time::SystemTime::now());
        assert_eq!(offered.len(), 1);
        offered[0]
            .url
            .strip_prefix("http://phone-reachable.example")
            .unwrap()
            .to_owned()
    };
    let actioner = support::start(&config);
    let router = &actioner.router;
    let press =
        |path: String| async move { call(router, "POST", &path, None, None, String::new()).await };

    // Paused: refused, journaled once however often it is pressed, and not used up.
    let path = press_path("00000000000000b1");
    api(router, "POST", "/api/v1/pause", String::new()).await;
    for _ in 0..5 {
        let (status, body) = press(path.clone()).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::CONFLICT, Some("paused"))
        );
    }
    let skipped = |journal: Vec<JournalEntry>| {
        journal
            .into_iter()
            .filter(|e| {
                e.event == Event::Skipped
                    && e.key.as_deref().is_some_and(|k| k.starts_with("button:"))
            })
            .count()
    };
    assert_eq!(skipped(setup.journal()), 1);
    api(router, "POST", "/api/v1/resume", String::new()).await;
    let (status, body) = press(path.clone()).await;
    assert_eq!(
        (status, &body["status"]),
        (StatusCode::OK, &"succeeded".into()),
        "{body}"
    );
    assert_eq!(setup.packets(), 1);

    // Once only.
    let (status, body) = press(path.clone()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["error"].as_str().unwrap().starts_with("already done"),
        "{body}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(setup.packets(), 0);

    // Another firing's button, after that firing resolved: refused.
    let path = press_path("00000000000000b2");
    let (status, _) = post_alerts(
        router,
        webhook(&alert(
            "NasAsleep",
            "00000000000000b2",
            "2026-11-22T21:00:00Z",
            "resolved",
        )),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = press(path).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["error"].as_str().unwrap().starts_with("resolved"),
        "{body}"
    );
    assert_eq!(setup.packets(), 0);

    // A button signed under another key, or none configured here: refused.
    let (status, _) = press("/api/v1/buttons/bm90IGEgdG9rZW4.AAAA".into()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failback_missed_while_paused_runs_at_the_resume_unless_the_gpu_got_busy_again() {
    let setup = Setup::new();
    failed_over_before(&setup.dir.path().join("state"));

    let config = setup.config_with(GAMING_DRY_RULES, DOCKER_FAILOVER);
    let actioner = support::start(&config);
    let router = &actioner.router;
    let (_, state) = api(router, "GET", "/api/v1/state", String::new()).await;
    assert_eq!(state["inference_backend"], "fallback");
    let deferred = |journal: &[JournalEntry]| {
        journal
            .iter()
            .filter(|e| {
                e.event == Event::Planned
                    && e.detail
                        .as_deref()
                        .is_some_and(|d| d.starts_with("deferred"))
            })
            .count()
    };

    // The game ends while paused: the failback is skipped, and runs at the resume.
    api(router, "POST", "/api/v1/pause", String::new()).await;
    let resolved = webhook(&alert(
        "Gaming",
        "00000000000000f1",
        "2026-11-22T21:00:00Z",
        "resolved",
    ));
    assert_eq!(post_alerts(router, resolved).await.0, StatusCode::OK);
    let journal = settled(&setup, "failback|00000000000000f1", Event::Skipped).await;
    assert_eq!(deferred(&journal), 0);
    api(router, "POST", "/api/v1/resume", String::new()).await;
    let journal = settled(&setup, "failback|00000000000000f1", Event::Planned).await;
    assert_eq!(deferred(&journal), 1, "{journal:#?}");
    // It runs (as the rule's dry run) through the executor like any other.
    let ran = |journal: &[JournalEntry]| {
        journal.iter().any(|e| {
            e.key
                .as_deref()
                .is_some_and(|k| k.contains("failback|00000000000000f1"))
                && e.detail
                    .as_deref()
                    .is_some_and(|d| d.starts_with("dry-run"))
        })
    };
    for _ in 0..100 {
        if ran(&setup.journal()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ran(&setup.journal()), "{:#?}", setup.journal());

    // Paused again: a game ends, another starts. At the resume the GPU is busy: no failback.
    api(router, "POST", "/api/v1/pause", String::new()).await;
    let body = webhook(&format!(
        "{},{}",
        alert(
            "Gaming",
            "00000000000000f2",
            "2026-11-22T22:00:00Z",
            "resolved"
        ),
        alert(
            "Gaming",
            "00000000000000f3",
            "2026-11-22T22:30:00Z",
            "firing"
        )
    ));
    assert_eq!(post_alerts(router, body).await.0, StatusCode::OK);
    settled(&setup, "failover|00000000000000f3", Event::Skipped).await;
    api(router, "POST", "/api/v1/resume", String::new()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(deferred(&setup.journal()), 1);
}

/// A failback held back while paused under one pair for the cluster, and the config since
/// changed to a pair per GPU node: at the resume there is no such pair to move. It is
/// journaled as skipped (no target), never run against some node's pair, and the state
/// shows the nodes' pairs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failback_held_back_for_a_pair_no_longer_configured_is_skipped_at_the_resume() {
    let setup = Setup::new();
    failed_over_before(&setup.dir.path().join("state"));
    let config = setup.config_with(GAMING_RULES, DOCKER_FAILOVER);
    let actioner = support::start(&config);
    let router = &actioner.router;
    api(router, "POST", "/api/v1/pause", String::new()).await;
    let resolved = webhook(&alert(
        "Gaming",
        "00000000000000f4",
        "2026-11-22T21:00:00Z",
        "resolved",
    ));
    assert_eq!(post_alerts(router, resolved).await.0, StatusCode::OK);
    settled(&setup, "failback|00000000000000f4", Event::Skipped).await;
    drop(actioner);

    let nodes: Config = aistack_common::config::parse(&format!(
        r#"
host: gpu-box
state_dir: {state}
exporter_url: "http://{{node}}:9470"
auth: {{bearer_token_file: /dev/null}}
rules:
{GAMING_RULES}
actions:
  failover:
    platform: kubernetes
    nodes:
      gpu-a:
        kubernetes: {{namespace: ml, primary: vllm-a, fallback: ollama-a, service: inference-a}}
        primary_health_url: "http://127.0.0.1:9/a"
        fallback_health_url: "http://127.0.0.1:9/oa"
"#,
        state = setup.dir.path().join("state").display(),
    ))
    .unwrap_or_else(|p| panic!("{p:?}"));
    let actioner = support::start(&nodes);
    let router = &actioner.router;
    api(router, "POST", "/api/v1/resume", String::new()).await;
    let journal = settled(&setup, "failback|00000000000000f4", Event::Skipped).await;
    let last = journal
        .iter()
        .rev()
        .find(|e| {
            e.key
                .as_deref()
                .is_some_and(|k| k.contains("failback|00000000000000f4"))
        })
        .unwrap();
    assert_eq!(
        (last.event, last.reason),
        (Event::Skipped, Some(Reason::NoTarget)),
        "{journal:#?}"
    );
    assert!(
        !journal
            .iter()
            .any(|e| e.event == Event::Started && e.action == Some(ActionKind::Failback)),
        "{journal:#?}"
    );
    let (_, state) = api(router, "GET", "/api/v1/state", String::new()).await;
    assert_eq!(
        state["nodes"]["gpu-a"]["inference_backend"], "primary",
        "{state}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_and_failback_never_overlap_whoever_asks() {
    let setup = Setup::new();
    let config = setup.config_with(GAMING_RULES, DOCKER_FAILOVER);
    let mut built = build_actions(&config).unwrap();
    let runs = stand_ins(
        &mut built,
        &[
            (ActionKind::Failover, Duration::from_millis(800)),
            (ActionKind::Failback, Duration::from_millis(200)),
        ],
    );
    let actioner = support::start_with(&config, built);
    let router = actioner.router.clone();
    // A game starts, and ends while Ollama is still coming up; a person presses failback too.
    let firing = webhook(&alert(
        "Gaming",
        "00000000000000a1",
        "2026-11-22T21:00:00Z",
        "firing",
    ));
    assert_eq!(post_alerts(&router, firing).await.0, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let resolved = webhook(&alert(
        "Gaming",
        "00000000000000a1",
        "2026-11-22T21:00:00Z",
        "resolved",
    ));
    assert_eq!(post_alerts(&router, resolved).await.0, StatusCode::OK);
    let manual = tokio::spawn({
        let router = router.clone();
        async move { api(&router, "POST", "/api/v1/actions/failback", "{}").await }
    });
    let (status, outcome) = manual.await.unwrap();
    assert_eq!(
        (status, outcome["status"].as_str()),
        (StatusCode::OK, Some("succeeded"))
    );
    for _ in 0..100 {
        if runs.all().len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        runs.kinds(),
        [
            ActionKind::Failover,
            ActionKind::Failback,
            ActionKind::Failback
        ],
        "in the order planned"
    );
    for pair in runs.all().windows(2) {
        assert!(
            pair[1].began >= pair[0].ended,
            "{} began before {} ended",
            pair[1].kind,
            pair[0].kind
        );
    }
    // The state follows the last run: the failback after the failover.
    let (_, state) = api(&router, "GET", "/api/v1/state", String::new()).await;
    assert_eq!(state["inference_backend"], "primary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failback_wants_positive_evidence_unless_forced() {
    let setup = Setup::new();
    // An exporter whose NVML is down: nothing says the GPU is free.
    let exporter = axum::Router::new().route(
        "/api/v1/gpu",
        axum::routing::get(|| async {
            axum::Json(serde_json::json!({"nvml_up": false, "sample_age_s": null, "gpus": []}))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let exporter_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, exporter).await });
    let mut config = setup.config_with("", DOCKER_FAILOVER);
    config.exporter_url = exporter_url;
    config.docker.socket = "unix:///nonexistent/docker.sock".into();
    let actioner = support::start(&config);
    let router = &actioner.router;
    let (status, outcome) = api(router, "POST", "/api/v1/actions/failback", "{}").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(outcome["status"], "skipped", "{outcome}");
    assert!(
        outcome["detail"].as_str().unwrap().contains("NVML is down"),
        "{outcome}"
    );
    // Forced, the check is skipped (the Docker engine is not there, so it fails after it).
    let (_, outcome) = api(
        router,
        "POST",
        "/api/v1/actions/failback",
        r#"{"force": true}"#,
    )
    .await;
    assert_eq!(outcome["status"], "failed", "{outcome}");
    assert!(
        outcome["detail"]
            .as_str()
            .unwrap()
            .contains("docker engine unreachable"),
        "{outcome}"
    );
    let forced: Vec<JournalEntry> = setup.journal().into_iter().filter(|e| e.force).collect();
    let events: Vec<Event> = forced.iter().map(|e| e.event).collect();
    assert_eq!(
        events,
        [Event::Planned, Event::Started, Event::Failed],
        "journaled as forced"
    );
    // Only failback can be forced.
    let (status, _) = api(
        router,
        "POST",
        "/api/v1/actions/failover",
        r#"{"force": true}"#,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}
