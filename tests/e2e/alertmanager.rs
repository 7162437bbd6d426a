//! The actioner behind a real Alertmanager: notifications reach the stand-in ntfy once per
//! firing and once per resolution, across re-sends and an actioner restart; a slow ntfy never
//! holds up a wake; rate limits are retried and failures journaled; a notification's button
//! wakes a host once.

use std::net::UdpSocket;
use std::process::Command;
use std::time::{Duration, SystemTime};

use aistack_tests::ntfy::{FakeNtfy, Mode};
use aistack_tests::{Alertmanager, Daemon, binary, free_port, get_with_token, wait_for};

const ACTIONER: &str = "aistack-actioner";
const TOKEN: &str = "0123456789abcdef";

struct Stack {
    dir: tempfile::TempDir,
    address: String,
    ntfy: FakeNtfy,
    udp: UdpSocket,
    actioner: Option<Daemon>,
    am: Alertmanager,
}

fn now() -> String {
    humantime_like(SystemTime::now())
}

/// RFC 3339 in UTC, seconds precision, without a dependency.
fn humantime_like(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let out = Command::new("date")
        .args(["-u", "-d", &format!("@{secs}"), "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

impl Stack {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ntfy = FakeNtfy::start();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        aistack_tests::write_secret(dir.path().join("token"), format!("{TOKEN}\n"));
        aistack_tests::write_secret(dir.path().join("ntfy.token"), "tk_ntfytoken\n");
        aistack_tests::write_secret(
            dir.path().join("buttons.key"),
            "5f2b9c0e7d41a8b36c9e0f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e\n",
        );
        let address = format!("127.0.0.1:{}", free_port());
        std::fs::write(
            dir.path().join("actioner.yaml"),
            format!(
                r#"
host: gpu-box
state_dir: {state}
auth: {{bearer_token_file: {token}}}
rules:
  - {{name: phone, match_re: {{severity: "critical|warning"}}, on: both, action: notify}}
  - {{name: wake, match: {{alertname: AistackWakeRequested}}, action: wake, target_label: host}}
actions:
  wake:
    targets:
      nas: {{mac: "aa:bb:cc:dd:ee:ff", broadcast: 127.0.0.1, port: {udp}}}
  notify:
    ntfy: {{url: "{ntfy}", topic: aistack-test, token_file: {ntfy_token}}}
    buttons:
      url: "http://{address}"
      key_file: {buttons_key}
      offer:
        - {{match: {{alertname: AistackHostAsleep}}, label: "Wake {{target}}", action: wake}}
        - {{match: {{alertname: AistackHostAsleep}}, label: "Wake the printer", action: wake, target_label: printer}}
"#,
                state = dir.path().join("state").display(),
                token = dir.path().join("token").display(),
                udp = udp.local_addr().unwrap().port(),
                ntfy = ntfy.url,
                ntfy_token = dir.path().join("ntfy.token").display(),
                buttons_key = dir.path().join("buttons.key").display(),
            ),
        )
        .unwrap();
        let am = Alertmanager::start(&format!(
            r#"
route:
  receiver: aistack
  group_by: [alertname]
  group_wait: 1s
  group_interval: 2s
  repeat_interval: 3s
receivers:
  - name: aistack
    webhook_configs:
      - url: http://{address}/api/v1/alerts
        send_resolved: true
        http_config:
          authorization:
            credentials_file: {token}
"#,
            token = dir.path().join("token").display(),
        ));
        let mut stack = Self {
            dir,
            address,
            ntfy,
            udp,
            actioner: None,
            am,
        };
        stack.start_actioner();
        stack
    }

    fn start_actioner(&mut self) {
        let config = self.dir.path().join("actioner.yaml");
        self.actioner = Some(Daemon::start_on(
            Command::new(binary(ACTIONER)),
            &["--config.file", config.to_str().unwrap()],
            &self.address,
        ));
    }

    fn restart_actioner(&mut self) {
        let status = self.actioner.take().unwrap().terminate();
        assert!(status.success(), "{status:?}");
        self.start_actioner();
    }

    fn journal(&self) -> Vec<serde_json::Value> {
        let reply = get_with_token(
            &format!("http://{}/api/v1/actions?limit=1000", self.address),
            TOKEN,
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        serde_json::from_str(&reply.body).unwrap()
    }

    fn metrics(&self) -> String {
        aistack_tests::get(&format!("http://{}/metrics", self.address)).body
    }
}

fn gpu_hot(ends_at: Option<&str>) -> serde_json::Value {
    let mut alert = serde_json::json!({
        "labels": {"alertname": "AistackGpuHot", "severity": "critical", "instance": "gpu-box:9470", "gpu": "0"},
        "annotations": {
            "summary": "GPU 0 at 91 °C",
            "description": "GPU 0 on gpu-box has been above 85 °C for 5 minutes.",
            "runbook_url": "https://github.com/aistack/aistack/blob/main/docs/runbooks/AistackGpuHot.md"
        },
        "startsAt": "2026-11-22T21:00:00Z",
        "generatorURL": "http://prometheus:9090/graph?g0.expr=x"
    });
    if let Some(end) = ends_at {
        alert["endsAt"] = serde_json::json!(end);
    }
    serde_json::json!([alert])
}

#[test]
fn a_phone_hears_once_per_firing_and_once_per_resolution() {
    let mut stack = Stack::start();
    stack.am.push(&gpu_hot(None));
    let published = wait_for(Duration::from_secs(20), "the notification", || {
        let p = stack.ntfy.published();
        (!p.is_empty()).then_some(p)
    });
    let m = &published[0];
    assert_eq!(m["topic"], "aistack-test");
    assert_eq!(m["title"], "[FIRING] AistackGpuHot: GPU 0 at 91 °C");
    assert_eq!(
        (m["priority"].as_u64(), m["markdown"].as_bool()),
        (Some(5), Some(true))
    );
    assert_eq!(m["tags"], serde_json::json!(["rotating_light"]));
    assert_eq!(
        m["click"],
        "https://github.com/aistack/aistack/blob/main/docs/runbooks/AistackGpuHot.md"
    );
    let sequence = m["sequence_id"].as_str().unwrap().to_owned();
    assert!(
        m["message"]
            .as_str()
            .unwrap()
            .contains("[Alertmanager](http://"),
        "{m}"
    );
    assert_eq!(stack.ntfy.authorization(), ["Bearer tk_ntfytoken"]);

    // Alertmanager re-sends every 3 s; the actioner restarts in between: still one.
    std::thread::sleep(Duration::from_secs(4));
    stack.restart_actioner();
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        stack.ntfy.published().len(),
        1,
        "{:#?}",
        stack.ntfy.published()
    );
    let duplicates = stack
        .journal()
        .iter()
        .filter(|e| {
            e["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("duplicate"))
        })
        .count();
    assert!(
        duplicates >= 2,
        "re-sends were recognised as such: {duplicates}"
    );

    // It resolves: one more, in the same sequence, and not loud.
    stack.am.push(&gpu_hot(Some(&now())));
    let published = wait_for(Duration::from_secs(20), "the resolution", || {
        let p = stack.ntfy.published();
        (p.len() >= 2).then_some(p)
    });
    let resolved = &published[1];
    assert!(
        resolved["title"]
            .as_str()
            .unwrap()
            .starts_with("[RESOLVED] AistackGpuHot"),
        "{resolved}"
    );
    assert_eq!(resolved["sequence_id"].as_str(), Some(sequence.as_str()));
    assert!(resolved["priority"].as_u64().unwrap() <= 3);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(stack.ntfy.published().len(), 2);
    let metrics = stack.metrics();
    assert!(
        metrics.contains(r#"aistack_actioner_webhooks_total{code="200"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"aistack_actioner_actions_total{action="notify",result="ok"} 1"#),
        "{metrics}"
    );
}

#[test]
fn a_stalled_ntfy_does_not_hold_up_a_wake() {
    let stack = Stack::start();
    stack.ntfy.set_mode(Mode::Stall);
    // A notification hangs on ntfy first ...
    stack.am.push(&gpu_hot(None));
    wait_for(Duration::from_secs(20), "a notify stuck on ntfy", || {
        (stack.ntfy.attempts() >= 1).then_some(())
    });
    // ... then someone needs the NAS: the wake goes out while ntfy still hangs.
    stack.am.push(&serde_json::json!([{
        "labels": {"alertname": "AistackWakeRequested", "severity": "warning", "host": "nas"},
        "annotations": {"summary": "someone needs the NAS"},
        "startsAt": now()
    }]));
    let mut buf = [0u8; 256];
    let (n, _) = stack.udp.recv_from(&mut buf).expect("the magic packet");
    assert_eq!(n, 102);
    assert_eq!(&buf[..6], &[0xff; 6]);
    assert_eq!(&buf[6..12], &[0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff]);
    assert!(stack.ntfy.published().is_empty(), "ntfy is still stuck");
}

#[test]
fn rate_limits_are_retried_and_failures_journaled() {
    let stack = Stack::start();
    stack.ntfy.set_mode(Mode::RateLimit(2));
    stack.am.push(&gpu_hot(None));
    wait_for(
        Duration::from_secs(30),
        "publication after two 429s",
        || (!stack.ntfy.published().is_empty()).then_some(()),
    );
    let succeeded = wait_for(Duration::from_secs(10), "the journal entry", || {
        stack
            .journal()
            .into_iter()
            .find(|e| e["event"] == "succeeded")
    });
    assert!(
        succeeded["detail"]
            .as_str()
            .unwrap()
            .ends_with("(attempt 3)"),
        "{succeeded}"
    );

    stack.ntfy.set_mode(Mode::Fail(100));
    stack.am.push(&serde_json::json!([{
        "labels": {"alertname": "AistackServiceDown", "severity": "warning", "service": "vllm"},
        "annotations": {"summary": "vllm is down"},
        "startsAt": now()
    }]));
    let failed = wait_for(Duration::from_secs(40), "the failure", || {
        stack.journal().into_iter().find(|e| e["event"] == "failed")
    });
    assert!(
        failed["detail"]
            .as_str()
            .unwrap()
            .contains("ntfy answered 500"),
        "{failed}"
    );
    assert!(
        failed["detail"].as_str().unwrap().ends_with("(attempt 4)"),
        "{failed}"
    );
    assert_eq!(failed["alert"]["name"], "AistackServiceDown");
    assert!(
        stack
            .metrics()
            .contains(r#"aistack_actioner_actions_total{action="notify",result="failed"} 1"#)
    );
}

#[test]
fn a_button_on_the_phone_wakes_the_host_once() {
    let mut stack = Stack::start();
    let asleep = |ends_at: Option<&str>| {
        let mut alert = serde_json::json!({
            "labels": {"alertname": "AistackHostAsleep", "severity": "warning", "host": "nas",
                       "printer": "hp-laserjet"},
            "annotations": {"summary": "nas is asleep"},
            "startsAt": "2026-11-22T21:00:00Z"
        });
        if let Some(end) = ends_at {
            alert["endsAt"] = serde_json::json!(end);
        }
        serde_json::json!([alert])
    };
    stack.am.push(&asleep(None));
    let published = wait_for(Duration::from_secs(20), "the notification", || {
        let p = stack.ntfy.published();
        (!p.is_empty()).then_some(p)
    });
    // One button: the printer is in no allowlist, so it gets none.
    let buttons = published[0]["actions"].as_array().unwrap().clone();
    assert_eq!(buttons.len(), 1, "{buttons:#?}");
    assert_eq!(
        (
            &buttons[0]["action"],
            &buttons[0]["label"],
            &buttons[0]["method"]
        ),
        (&"http".into(), &"Wake nas".into(), &"POST".into())
    );
    let url = buttons[0]["url"].as_str().unwrap().to_owned();
    let prefix = format!("http://{}/api/v1/buttons/", stack.address);
    assert!(url.starts_with(&prefix), "{url}");
    stack
        .udp
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 256];
    assert!(
        stack.udp.recv_from(&mut buf).is_err(),
        "nothing woke it yet"
    );

    // The phone presses it: no bearer token, an empty body, as the ntfy app sends it.
    let reply = aistack_tests::try_post_json(&url, None, "").unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    let (n, _) = stack.udp.recv_from(&mut buf).expect("the magic packet");
    assert_eq!(
        (n, &buf[6..12]),
        (102, &[0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff][..])
    );

    // Pressed again, before and after a restart: refused, nothing sent.
    let again = aistack_tests::try_post_json(&url, None, "").unwrap();
    assert_eq!(again.status, 409, "{}", again.body);
    stack.restart_actioner();
    let again = aistack_tests::try_post_json(&url, None, "").unwrap();
    assert_eq!(again.status, 409, "{}", again.body);
    assert!(again.body.contains("already done"), "{}", again.body);
    assert!(stack.udp.recv_from(&mut buf).is_err(), "woken twice");

    // A forged or garbled token is refused.
    let token = &url[prefix.len()..];
    let (payload, tag) = token.split_once('.').unwrap();
    let flipped = if tag.starts_with('A') { "B" } else { "A" };
    for bad in [
        format!("{prefix}{payload}.{flipped}{}", &tag[1..]),
        format!("{prefix}not-a-token"),
    ] {
        let reply = aistack_tests::try_post_json(&bad, None, "").unwrap();
        assert_eq!(reply.status, 403, "{bad}: {}", reply.body);
    }
    assert!(
        stack.udp.recv_from(&mut buf).is_err(),
        "a forged press woke it"
    );

    let journal = stack.journal();
    let runs: Vec<_> = journal
        .iter()
        .filter(|e| {
            e["key"]
                .as_str()
                .is_some_and(|k| k.starts_with("button:wake:nas:"))
        })
        .collect();
    assert_eq!(
        runs.iter().filter(|e| e["event"] == "planned").count(),
        1,
        "{runs:#?}"
    );
    assert!(
        runs.iter()
            .any(|e| e["event"] == "succeeded" && e["rule"] == "manual:button")
    );
    assert_eq!(
        runs.iter().filter(|e| e["event"] == "skipped").count(),
        2,
        "{runs:#?}"
    );

    // The resolution replaces the notification, without buttons.
    stack.am.push(&asleep(Some(&now())));
    let published = wait_for(Duration::from_secs(20), "the resolution", || {
        let p = stack.ntfy.published();
        (p.len() >= 2).then_some(p)
    });
    assert!(published[1].get("actions").is_none(), "{}", published[1]);
}
