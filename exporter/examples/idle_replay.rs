//! Replays a synthetic day (exporter/tests/support/trace.rs) through the idle engine with the
//! default config and prints what it found, for docs/idle.md.
//!
//! ```sh
//! cargo run --release -p aistack-exporter --example idle_replay
//! ```

#[path = "../tests/support/trace.rs"]
mod trace;

use std::time::Duration;

use aistack_exporter::idle::{Gate, GateKind, IdleConfig, IdleEngine, IdleState, Observation};

fn main() {
    for (label, network_gate) in [
        ("default gates (network 1 MiB/s)", 1u64 << 20),
        ("network gate off", 0),
    ] {
        let mut engine = IdleEngine::new(IdleConfig::default());
        let (mut idle, mut ready, mut ready_busy, mut flips) = (0u64, 0u64, 0u64, 0u64);
        let mut first_ready_after_noon = None;
        let mut last_state = IdleState::WarmingUp;
        for s in trace::day(7) {
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
            idle += u64::from(v.state == IdleState::Idle);
            ready += u64::from(v.suspend_ready);
            ready_busy += u64::from(v.suspend_ready && s.activity.busy());
            flips += u64::from(v.state != last_state);
            last_state = v.state;
            if v.suspend_ready && s.t >= 12 * 3600 && first_ready_after_noon.is_none() {
                first_ready_after_noon = Some(s.t);
            }
        }
        let quiet = trace::day(7).iter().filter(|s| !s.activity.busy()).count() as u64;
        let hhmm = |t: u64| format!("{:02}:{:02}", t / 3600, t % 3600 / 60);
        println!("{label}:");
        println!("  quiet minutes in the trace:          {}", quiet / 60);
        println!("  minutes the engine found idle:       {}", idle / 60);
        println!("  minutes suspend-ready:               {}", ready / 60);
        println!("  suspend-ready while in use (s):      {ready_busy}");
        println!("  state changes over the day:          {flips}");
        println!(
            "  first suspend-ready after noon:      {}",
            first_ready_after_noon.map_or("never".into(), hhmm)
        );
    }
}
