//! A day-long synthetic trace through the idle engine (tests/support/trace.rs): it must never
//! be ready to suspend while someone uses the host, and must find the quiet hours.
//! `cargo run -p aistack-exporter --example idle_replay` prints the figures in docs/idle.md.

#[path = "support/trace.rs"]
mod trace;

use std::time::Duration;

use aistack_exporter::idle::{Gate, GateKind, IdleConfig, IdleEngine, IdleState, Observation};

/// Replays the day; `network_gate` as in `idle.gates.network_bytes_per_second`.
fn replay(network_gate: u64) -> Vec<(trace::Second, IdleState, bool)> {
    let mut engine = IdleEngine::new(IdleConfig::default());
    trace::day(7)
        .into_iter()
        .map(|s| {
            let mut gates = Vec::new();
            if network_gate > 0 && s.network > network_gate {
                gates.push(Gate {
                    kind: GateKind::Network,
                    detail: "network".into(),
                });
            }
            let at = Duration::from_secs(1_000 + s.t);
            let v = engine.observe(Observation {
                monotonic: at,
                boottime: at,
                cpu: Some(s.cpu),
                gpu: Some(s.gpu),
                gates,
            });
            (s, v.state, v.suspend_ready)
        })
        .collect()
}

#[test]
fn never_ready_to_suspend_while_the_host_is_in_use() {
    let day = replay(1 << 20);
    let wrong: Vec<u64> = day
        .iter()
        .filter(|(s, _, ready)| *ready && s.activity.busy())
        .map(|(s, _, _)| s.t)
        .collect();
    assert!(
        wrong.is_empty(),
        "suspend-ready during activity at {:?}...",
        &wrong[..wrong.len().min(5)]
    );
    // The quiet afternoon (12:00-18:00) is found: ready from about 12:31 on.
    let afternoon_ready = day
        .iter()
        .filter(|(s, _, ready)| *ready && (12 * 3600..18 * 3600).contains(&s.t))
        .count();
    assert!(
        afternoon_ready > 5 * 3600,
        "{afternoon_ready} s ready in the afternoon"
    );
    // The night's cron spikes do not flap the state.
    let night_flips = day
        .windows(2)
        .filter(|w| w[0].0.t < 7 * 3600 && w[0].1 != w[1].1)
        .count();
    assert!(night_flips <= 2, "{night_flips} state changes in the night");
}

#[test]
fn without_the_network_gate_a_slow_download_would_be_cut() {
    // The reason the gate exists: a download at 5 % CPU looks idle.
    let day = replay(0);
    let during_download = day
        .iter()
        .filter(|(s, _, ready)| *ready && s.activity == trace::Activity::Download)
        .count();
    assert!(during_download > 0);
}
