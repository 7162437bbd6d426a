//! The idle engine and the logind collector end to end: the exporter binary on a private
//! system bus (a real dbus-daemon) with a stand-in logind, inhibitors and sessions coming and
//! going, the bus going away, and `GET /api/v1/idle`.

use std::process::Command;
use std::time::Duration;

use aistack_tests::login1::{Login1, Session};
use aistack_tests::{Daemon, assert_documented, binary, wait_for};

const EXPORTER: &str = "aistack-exporter";

fn value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

fn start(login1: &Login1, dir: &std::path::Path) -> Daemon {
    let config = dir.join("exporter.yaml");
    std::fs::write(
        &config,
        "collectors:\n  logind: {interval: 1s}\n  idle: {interval: 1s}\n  docker: {enabled: false}\n\
         idle: {window_seconds: 5, idle_timeout_seconds: 60}\n",
    )
    .unwrap();
    let mut command = Command::new(binary(EXPORTER));
    command.env("DBUS_SYSTEM_BUS_ADDRESS", &login1.bus.address);
    Daemon::start_with(command, &["--config.file", config.to_str().unwrap()])
}

/// The idle JSON; `None` before the engine's first verdict (503).
fn idle_json(exporter: &Daemon) -> Option<serde_json::Value> {
    let reply = exporter.get("/api/v1/idle");
    if reply.status == 503 {
        assert!(reply.body.contains("no verdict yet"), "{}", reply.body);
        return None;
    }
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(
        reply.content_type.starts_with("application/json"),
        "{}",
        reply.content_type
    );
    Some(serde_json::from_str(&reply.body).unwrap())
}

#[test]
fn inhibitors_and_sessions_gate_suspend_within_one_interval() {
    let login1 = Login1::start();
    login1.add_session(Session {
        id: "2".into(),
        user: "gamer".into(),
        class: "user".into(),
        remote: false,
        remote_host: String::new(),
    });
    login1.inhibit(
        "shutdown",
        "NetworkManager",
        "NetworkManager needs to turn off networks",
        "delay",
    );
    let dir = tempfile::tempdir().unwrap();
    let exporter = start(&login1, dir.path());

    let body = wait_for(Duration::from_secs(15), "logind_up 1", || {
        let body = exporter.scrape().body;
        (value(&body, "aistack_logind_up") == Some(1.0)).then_some(body)
    });
    assert_eq!(
        value(
            &body,
            r#"aistack_logind_sessions{class="user",remote="false"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &body,
            r#"aistack_logind_inhibitors{who="NetworkManager",why="NetworkManager needs to turn off networks",what="shutdown",mode="delay"}"#
        ),
        Some(1.0)
    );
    assert!(value(&body, "aistack_host_suspended_seconds_total").is_some_and(|s| s >= 0.0));
    assert_documented(&body);

    // The JSON the actioner reads, with exactly the contract's keys.
    let json = wait_for(Duration::from_secs(15), "the window to fill", || {
        let json = idle_json(&exporter)?;
        (json["state"] != "warming_up").then_some(json)
    });
    let mut keys: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "cpu_idle_pct",
            "gating_reasons",
            "gpu_idle_pct",
            "idle_for_s",
            "state",
            "suspend_ready",
            "threshold_s"
        ]
    );
    assert!(
        ["active", "idle"].contains(&json["state"].as_str().unwrap()),
        "{json}"
    );
    assert_eq!(json["threshold_s"], 60);
    // No NVML here: the GPU's idle share is unknown, null (0.1.0 claimed 100); the CPU's known.
    assert!(json["gpu_idle_pct"].is_null(), "{json}");
    assert!(json["cpu_idle_pct"].as_f64().is_some(), "{json}");
    assert_eq!(
        json["gating_reasons"],
        serde_json::json!([]),
        "a delay lock on shutdown does not block sleep"
    );

    // A program takes a block lock on sleep: gated within one logind interval.
    login1.inhibit("sleep:shutdown", "backup", "copying 2 TB", "block");
    let json = wait_for(Duration::from_secs(5), "the inhibitor gate", || {
        let json = idle_json(&exporter)?;
        (json["gating_reasons"] != serde_json::json!([])).then_some(json)
    });
    assert_eq!(
        json["gating_reasons"],
        serde_json::json!(["inhibitor: backup (copying 2 TB)"])
    );
    assert_eq!(json["suspend_ready"], false);
    let body = exporter.scrape().body;
    assert_eq!(
        value(&body, r#"aistack_idle_gate_blocking{reason="inhibitor"}"#),
        Some(1.0)
    );
    assert_eq!(value(&body, "aistack_idle_suspend_ready"), Some(0.0));

    // Someone logs in over SSH; the backup finishes.
    login1.add_session(Session {
        id: "7".into(),
        user: "alice".into(),
        class: "user".into(),
        remote: true,
        remote_host: "10.0.0.5".into(),
    });
    login1.release("backup");
    let json = wait_for(
        Duration::from_secs(5),
        "the remote session gate alone",
        || {
            let json = idle_json(&exporter)?;
            (json["gating_reasons"] == serde_json::json!(["remote session: alice from 10.0.0.5"]))
                .then_some(json)
        },
    );
    assert_eq!(json["suspend_ready"], false);
    login1.remove_session("7");
    wait_for(Duration::from_secs(5), "no gate", || {
        (idle_json(&exporter)?["gating_reasons"] == serde_json::json!([])).then_some(())
    });
}

#[test]
fn without_the_bus_logind_is_down_and_the_engine_runs_on() {
    let mut login1 = Login1::start();
    login1.inhibit("sleep", "backup", "copying", "block");
    let dir = tempfile::tempdir().unwrap();
    let exporter = start(&login1, dir.path());
    wait_for(
        Duration::from_secs(15),
        "the inhibitor gate, warmed up",
        || {
            let json = idle_json(&exporter)?;
            let gated =
                json["gating_reasons"] == serde_json::json!(["inhibitor: backup (copying)"]);
            (gated && json["state"] != "warming_up").then_some(())
        },
    );

    login1.bus.stop();
    let body = wait_for(Duration::from_secs(10), "logind_up 0", || {
        let body = exporter.scrape().body;
        (value(&body, "aistack_logind_up") == Some(0.0)).then_some(body)
    });
    assert!(!body.contains("aistack_logind_inhibitors{"), "{body}");
    // What is lost without logind: its gates. The engine still decides.
    let json = wait_for(
        Duration::from_secs(5),
        "the gate to go with the bus",
        || {
            let json = idle_json(&exporter)?;
            (json["gating_reasons"] == serde_json::json!([])).then_some(json)
        },
    );
    assert_ne!(json["state"], "warming_up");
    assert!(
        exporter
            .log()
            .iter()
            .any(|l| l.contains("systemd-logind went away") && l.contains(r#""level":"WARN""#))
    );
}

#[test]
fn the_idle_api_says_when_the_engine_is_off() {
    let exporter = Daemon::start(EXPORTER, &["--no-collector.idle"]);
    let reply = exporter.get("/api/v1/idle");
    assert_eq!(reply.status, 404);
    assert!(
        reply.body.contains("the idle collector is disabled"),
        "{}",
        reply.body
    );
}
