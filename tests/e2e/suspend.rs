//! The suspend action end to end: the actioner binary on a private system bus with the
//! stand-in logind, re-checking a stand-in exporter's `/api/v1/idle` (the real exporter needs
//! an hour of real idleness to say ready).

use std::process::Command;
use std::time::Duration;

use aistack_tests::login1::Login1;
use aistack_tests::stub::StubServer;
use aistack_tests::{Daemon, binary, get_with_token, post_json, wait_for};

const TOKEN: &str = "0123456789abcdef";
const READY: &str = r#"{"state":"idle","idle_for_s":1900,"threshold_s":1800,"cpu_idle_pct":98.1,"gpu_idle_pct":100.0,"suspend_ready":true,"gating_reasons":[]}"#;
const BUSY: &str = r#"{"state":"idle","idle_for_s":0,"threshold_s":1800,"cpu_idle_pct":98.1,"gpu_idle_pct":100.0,"suspend_ready":false,"gating_reasons":["remote session: alice from 10.0.0.5"]}"#;

struct Setup {
    login1: Login1,
    exporter: StubServer,
    actioner: Daemon,
    config: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn start_actioner(login1: &Login1, config: &std::path::Path) -> Daemon {
    let mut command = Command::new(binary("aistack-actioner"));
    command.env("DBUS_SYSTEM_BUS_ADDRESS", &login1.bus.address);
    Daemon::start_with(command, &["--config.file", config.to_str().unwrap()])
}

fn start(mode: &str) -> Setup {
    let login1 = Login1::start();
    let exporter = StubServer::start();
    exporter.set("/api/v1/idle", 200, READY);
    let dir = tempfile::tempdir().unwrap();
    aistack_tests::write_secret(dir.path().join("token"), TOKEN);
    let config = dir.path().join("actioner.yaml");
    std::fs::write(
        &config,
        format!(
            "host: gpu-box\nstate_dir: {}\nexporter_url: {}\nauth: {{bearer_token_file: {}}}\n\
             rules:\n  - {{name: sleep, match: {{alertname: AistackHostIdle}}, action: suspend}}\n\
             actions:\n  suspend: {{mode: {mode}}}\n",
            dir.path().join("state").display(),
            exporter.url,
            dir.path().join("token").display(),
        ),
    )
    .unwrap();
    let actioner = start_actioner(&login1, &config);
    Setup {
        login1,
        exporter,
        actioner,
        config,
        _dir: dir,
    }
}

fn idle_alert(instance: &str, fingerprint: &str, starts_at: &str) -> String {
    format!(
        r#"{{"version":"4","status":"firing","alerts":[{{"status":"firing","labels":{{"alertname":"AistackHostIdle","instance":"{instance}"}},"startsAt":"{starts_at}","fingerprint":"{fingerprint}"}}]}}"#
    )
}

impl Setup {
    /// Stops the actioner and starts another on the same state directory.
    fn restart(&mut self) {
        let old = std::mem::replace(
            &mut self.actioner,
            start_actioner(&self.login1, &self.config),
        );
        drop(old);
    }

    fn alert(&self, instance: &str, fingerprint: &str, starts_at: &str) {
        let reply = post_json(
            &self.actioner.url("/api/v1/alerts"),
            Some(TOKEN),
            &idle_alert(instance, fingerprint, starts_at),
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
    }

    /// The journal's last entry for a key containing `fingerprint` once it ended.
    fn outcome(&self, fingerprint: &str) -> serde_json::Value {
        wait_for(Duration::from_secs(15), "the run to end", || {
            let reply = get_with_token(&self.actioner.url("/api/v1/actions?limit=100"), TOKEN);
            let entries: Vec<serde_json::Value> = serde_json::from_str(&reply.body).unwrap();
            entries.into_iter().find(|e| {
                e["key"].as_str().is_some_and(|k| k.contains(fingerprint))
                    && ["succeeded", "failed", "skipped"]
                        .contains(&e["event"].as_str().unwrap_or(""))
            })
        })
    }
}

#[test]
fn suspends_when_the_exporter_and_logind_agree_and_not_again_right_after() {
    let mut s = start("suspend");
    s.alert("gpu-box:9470", "a1", "2026-11-22T21:00:00Z");
    let done = s.outcome("a1");
    assert_eq!(done["event"], "succeeded", "{done}");
    assert_eq!(s.login1.state().calls, ["Suspend(false)"]);
    assert_eq!(
        s.exporter.hits("/api/v1/idle"),
        1,
        "re-checked right before acting"
    );

    // The host wakes; a stale alert of a new firing arrives at once: not back to sleep.
    s.alert("gpu-box:9470", "a2", "2026-11-22T22:00:00Z");
    let again = s.outcome("a2");
    assert_eq!(again["event"], "skipped", "{again}");
    assert!(
        again["detail"].as_str().unwrap().contains("put to sleep"),
        "{again}"
    );
    assert_eq!(s.login1.state().calls.len(), 1);

    // Nor after the actioner restarts: the journal keeps where the host stood when it slept.
    s.restart();
    s.alert("gpu-box:9470", "a3", "2026-11-22T23:00:00Z");
    let after_restart = s.outcome("a3");
    assert_eq!(after_restart["event"], "skipped", "{after_restart}");
    assert!(
        after_restart["detail"]
            .as_str()
            .unwrap()
            .contains("put to sleep"),
        "{after_restart}"
    );
    assert_eq!(s.login1.state().calls.len(), 1);
}

#[test]
fn re_checks_stop_it_an_exporter_that_is_not_ready_or_a_block_inhibitor() {
    let s = start("hibernate");
    s.exporter.set("/api/v1/idle", 200, BUSY);
    s.alert("gpu-box:9470", "b1", "2026-11-22T21:00:00Z");
    let skipped = s.outcome("b1");
    assert_eq!(skipped["event"], "skipped", "{skipped}");
    assert!(
        skipped["detail"]
            .as_str()
            .unwrap()
            .contains("remote session: alice"),
        "{skipped}"
    );

    s.exporter.set("/api/v1/idle", 200, READY);
    s.login1.inhibit("sleep", "backup", "copying 2 TB", "block");
    s.alert("gpu-box:9470", "b2", "2026-11-22T21:00:00Z");
    let skipped = s.outcome("b2");
    assert_eq!(
        skipped["detail"],
        "condition no longer true: inhibitor: backup (copying 2 TB)"
    );

    // A delay lock does not stop it; the configured mode is used.
    s.login1.release("backup");
    s.login1
        .inhibit("sleep", "NetworkManager", "disconnect first", "delay");
    s.alert("gpu-box:9470", "b3", "2026-11-22T21:00:00Z");
    assert_eq!(s.outcome("b3")["event"], "succeeded");
    assert_eq!(s.login1.state().calls, ["Hibernate(false)"]);
}

#[test]
fn other_hosts_a_down_exporter_and_missing_permission_never_suspend() {
    let s = start("suspend");
    s.alert("other-box:9470", "c1", "2026-11-22T21:00:00Z");
    let reply = get_with_token(&s.actioner.url("/api/v1/actions?limit=10"), TOKEN);
    assert!(
        reply
            .body
            .contains("not this host: the alert is about other-box"),
        "{}",
        reply.body
    );

    s.exporter
        .set("/api/v1/idle", 503, r#"{"error":"no verdict yet"}"#);
    s.alert("gpu-box:9470", "c2", "2026-11-22T21:00:00Z");
    assert_eq!(s.outcome("c2")["event"], "skipped");

    s.exporter.set("/api/v1/idle", 200, READY);
    s.login1.state().can_sleep = "challenge".into();
    s.alert("gpu-box:9470", "c3", "2026-11-22T21:00:00Z");
    let failed = s.outcome("c3");
    assert_eq!(failed["event"], "failed");
    assert!(
        failed["detail"]
            .as_str()
            .unwrap()
            .contains("CanSuspend=challenge (needs a polkit rule"),
        "{failed}"
    );
    assert!(s.login1.state().calls.is_empty());
}
