//! The idle engine: decides, from CPU and GPU utilization over a sliding window and a set of
//! gates, whether this host is idle and may be suspended.
//!
//! It is pure: it is fed [`Observation`]s (clock readings, utilization, gates that block now)
//! and answers a [`Verdict`]; the `idle` collector gathers the inputs and publishes the
//! verdict. Time is CLOCK_MONOTONIC, which neither jumps with the wall clock nor runs while the
//! host sleeps; a jump of CLOCK_BOOTTIME ahead of it means the host was suspended, and the
//! engine starts warming up again.
//!
//! - `warming_up` until the window (`idle.window_seconds`) has filled since start or resume.
//! - `idle` when the window's mean CPU utilization is below `cpu_idle_threshold` and the mean
//!   utilization of the busiest GPU below `gpu_idle_threshold`; back to `active` only when a
//!   mean rises above its threshold plus `hysteresis`, so noise at the edge does not flap it —
//!   or at once when the GPU's utilization right now does: a GPU is never busy by accident.
//! - `idle_seconds` counts from the moment the state turned idle and resets on activity; a
//!   blocking gate is activity too (it holds the timer at zero), so the host sleeps only after
//!   a full timeout with nothing going on — not the moment a download or an SSH session ends.
//! - `suspend_ready` when idle for `idle_timeout_seconds` and no gate blocks.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use aistack_common::config::{Problems, check_regex};
use serde::Deserialize;

/// `idle:` in the config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdleConfig {
    /// The host counts as idle below this CPU utilization (0..1, default 0.10).
    pub cpu_idle_threshold: f64,
    /// ... and below this utilization on every GPU (0..1, default 0.05).
    pub gpu_idle_threshold: f64,
    /// Sliding window the means are taken over (default 60).
    pub window_seconds: u64,
    /// Idle this long, with no gate blocking, means ready to suspend (default 1800).
    pub idle_timeout_seconds: u64,
    /// How far above a threshold a mean must rise to end idleness (default 0.02).
    pub hysteresis: f64,
    /// What else blocks suspending.
    pub gates: GatesConfig,
}

impl Default for IdleConfig {
    fn default() -> Self {
        Self {
            cpu_idle_threshold: 0.10,
            gpu_idle_threshold: 0.05,
            window_seconds: 60,
            idle_timeout_seconds: 1800,
            hysteresis: 0.02,
            gates: GatesConfig::default(),
        }
    }
}

/// `idle.gates:` — logind block inhibitors on sleep always block and are not listed here.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatesConfig {
    /// Remote (SSH) login sessions block (default true).
    pub remote_sessions: bool,
    /// A configured service's process on a GPU that is busy now blocks (default true).
    pub service_busy: bool,
    /// A 1-minute load average above this blocks (default: off).
    pub load_above: Option<f64>,
    /// Established TCP connections to these local ports block (e.g. 22, 445, 2049).
    pub connection_ports: Vec<u16>,
    /// Running processes whose name matches one of these regexes block (e.g. rsync, borg).
    pub processes: Vec<String>,
    /// Network traffic above this many bytes per second, in and out on the physical
    /// interfaces, blocks: a download at low CPU (default 1 MiB/s; 0 turns it off).
    pub network_bytes_per_second: u64,
}

impl Default for GatesConfig {
    fn default() -> Self {
        Self {
            remote_sessions: true,
            service_busy: true,
            load_above: None,
            connection_ports: Vec::new(),
            processes: Vec::new(),
            network_bytes_per_second: 1 << 20,
        }
    }
}

impl IdleConfig {
    /// Checks ranges and patterns.
    pub fn validate(&self, problems: &mut Problems) {
        for (key, value) in [
            ("cpu_idle_threshold", self.cpu_idle_threshold),
            ("gpu_idle_threshold", self.gpu_idle_threshold),
            ("hysteresis", self.hysteresis),
        ] {
            problems.check(
                (0.0..=1.0).contains(&value),
                format!("idle.{key}"),
                format!("must be a ratio from 0 to 1, got {value}"),
            );
        }
        problems.check(
            self.window_seconds >= 5,
            "idle.window_seconds",
            "must be at least 5",
        );
        problems.check(
            self.idle_timeout_seconds >= 60,
            "idle.idle_timeout_seconds",
            "must be at least 60",
        );
        if let Some(load) = self.gates.load_above {
            problems.check(
                load.is_finite() && load > 0.0,
                "idle.gates.load_above",
                format!("must be a load above 0, got {load}"),
            );
        }
        for (i, pattern) in self.gates.processes.iter().enumerate() {
            check_regex(
                problems,
                format!("idle.gates.processes[{i}]"),
                pattern,
                str::to_owned,
            );
        }
        for (i, port) in self.gates.connection_ports.iter().enumerate() {
            problems.check(
                *port != 0,
                format!("idle.gates.connection_ports[{i}]"),
                "must be 1..65535",
            );
        }
    }
}

/// The three states, the `state` label of `aistack_idle_state` and `state` in
/// `GET /api/v1/idle`: one definition, shared with the actioner that reads it.
pub use aistack_common::api::IdleState;

/// What kind of gate blocks: the `reason` label of `aistack_idle_gate_blocking`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GateKind {
    /// A logind block inhibitor on sleep.
    Inhibitor,
    /// A remote login session.
    RemoteSession,
    /// A configured service busy on a GPU.
    ServiceBusy,
    /// Load average above the limit.
    Load,
    /// Established connections on watched ports.
    Connections,
    /// A watched process runs.
    Process,
    /// Network traffic above the limit.
    Network,
}

impl GateKind {
    /// Every kind, in label order.
    pub const ALL: [GateKind; 7] = [
        Self::Inhibitor,
        Self::RemoteSession,
        Self::ServiceBusy,
        Self::Load,
        Self::Connections,
        Self::Process,
        Self::Network,
    ];

    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Inhibitor => "inhibitor",
            Self::RemoteSession => "remote_session",
            Self::ServiceBusy => "service_busy",
            Self::Load => "load",
            Self::Connections => "connections",
            Self::Process => "process",
            Self::Network => "network",
        }
    }
}

/// A gate that blocks suspending now, and why in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gate {
    /// Which kind.
    pub kind: GateKind,
    /// For people: "inhibitor: Unattended Upgrades (upgrading packages)".
    pub detail: String,
}

impl fmt::Display for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

/// One set of inputs.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Observation {
    /// CLOCK_MONOTONIC.
    pub monotonic: Duration,
    /// CLOCK_BOOTTIME (monotonic plus time spent suspended).
    pub boottime: Duration,
    /// CPU utilization now, 0..1; `None` when unknown.
    pub cpu: Option<f64>,
    /// Utilization of the busiest GPU now, 0..1; `None` without GPUs.
    pub gpu: Option<f64>,
    /// Gates blocking now.
    pub gates: Vec<Gate>,
}

/// The engine's answer after an observation.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// The state.
    pub state: IdleState,
    /// How long the host has been idle (0 unless idle).
    pub idle_for: Duration,
    /// `idle_timeout_seconds`.
    pub threshold: Duration,
    /// CPU idle share over the window, percent; `None` while no CPU reading is in it.
    pub cpu_idle_pct: Option<f64>,
    /// Idle share of the busiest GPU over the window, percent; `None` while no GPU reading is
    /// in it (NVML down, or no GPU).
    pub gpu_idle_pct: Option<f64>,
    /// Idle long enough and no gate blocks.
    pub suspend_ready: bool,
    /// Gates blocking now.
    pub gates: Vec<Gate>,
    /// Whether this observation found the host had been suspended (and restarted warm-up).
    pub resumed: bool,
}

#[derive(Debug, Clone, Copy)]
struct Point {
    at: Duration,
    cpu: Option<f64>,
    gpu: Option<f64>,
}

/// Time the host may have spent suspended unnoticed between two observations.
const RESUME_SLACK: Duration = Duration::from_secs(1);

/// The engine. See the module docs.
#[derive(Debug)]
pub struct IdleEngine {
    config: IdleConfig,
    window: VecDeque<Point>,
    since: Option<Duration>,
    state: IdleState,
    idle_since: Option<Duration>,
    last: Option<(Duration, Duration)>,
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

impl IdleEngine {
    /// A fresh engine, warming up.
    pub fn new(config: IdleConfig) -> Self {
        Self {
            config,
            window: VecDeque::new(),
            since: None,
            state: IdleState::WarmingUp,
            idle_since: None,
            last: None,
        }
    }

    fn restart(&mut self, at: Duration) {
        self.window.clear();
        self.since = Some(at);
        self.state = IdleState::WarmingUp;
        self.idle_since = None;
    }

    /// Takes one observation and answers the verdict.
    pub fn observe(&mut self, o: Observation) -> Verdict {
        let offset = o.boottime.saturating_sub(o.monotonic);
        let mut resumed = false;
        match self.last {
            None => self.restart(o.monotonic),
            Some((monotonic, last_offset)) => {
                if offset > last_offset + RESUME_SLACK {
                    resumed = true;
                    self.restart(o.monotonic);
                } else if o.monotonic < monotonic {
                    // CLOCK_MONOTONIC never goes back; if it seems to, trust nothing before.
                    self.restart(o.monotonic);
                }
            }
        }
        self.last = Some((o.monotonic, offset));

        let window = Duration::from_secs(self.config.window_seconds);
        self.window.push_back(Point {
            at: o.monotonic,
            cpu: o.cpu.map(|c| c.clamp(0.0, 1.0)),
            gpu: o.gpu.map(|g| g.clamp(0.0, 1.0)),
        });
        while self
            .window
            .front()
            .is_some_and(|p| o.monotonic.saturating_sub(p.at) > window)
        {
            self.window.pop_front();
        }
        let cpu = mean(self.window.iter().filter_map(|p| p.cpu));
        let gpu = mean(self.window.iter().filter_map(|p| p.gpu));

        let full = self
            .since
            .is_some_and(|s| o.monotonic.saturating_sub(s) >= window);
        if full {
            let (c, g, h) = (
                self.config.cpu_idle_threshold,
                self.config.gpu_idle_threshold,
                self.config.hysteresis,
            );
            // Without CPU data the engine cannot tell: never idle.

            // A GPU that starts working ends idleness at once: nothing on a GPU is noise the
            // way a cron job's CPU spike is, and a game or a request must not wait a window.
            let gpu_now = o.gpu.is_some_and(|u| u > g + h);
            let quiet = cpu.is_some_and(|u| u < c) && gpu.is_none_or(|u| u < g) && !gpu_now;
            let busy = cpu.is_none_or(|u| u > c + h) || gpu.is_some_and(|u| u > g + h) || gpu_now;
            self.state = match self.state {
                IdleState::Idle if busy => IdleState::Active,
                IdleState::Idle => IdleState::Idle,
                _ if quiet => IdleState::Idle,
                _ => IdleState::Active,
            };
            match self.state {
                // A gate is activity too (a download, an SSH session, a backup's inhibitor):
                // while one blocks, the idle timer stays at zero, so a full timeout follows it.
                IdleState::Idle if !o.gates.is_empty() => self.idle_since = Some(o.monotonic),
                IdleState::Idle => {
                    self.idle_since.get_or_insert(o.monotonic);
                }
                _ => self.idle_since = None,
            }
        }
        let idle_for = self
            .idle_since
            .map_or(Duration::ZERO, |s| o.monotonic.saturating_sub(s));
        let threshold = Duration::from_secs(self.config.idle_timeout_seconds);
        Verdict {
            state: self.state,
            idle_for,
            threshold,
            cpu_idle_pct: cpu.map(|u| (1.0 - u) * 100.0),
            gpu_idle_pct: gpu.map(|u| (1.0 - u) * 100.0),
            suspend_ready: self.state == IdleState::Idle
                && idle_for >= threshold
                && o.gates.is_empty(),
            gates: o.gates,
            resumed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> IdleConfig {
        IdleConfig {
            window_seconds: 10,
            idle_timeout_seconds: 60,
            ..IdleConfig::default()
        }
    }

    /// Feeds one observation per second, from second `from`, CPU `cpu`, no GPU, no gates.
    struct Feed {
        engine: IdleEngine,
        t: u64,
        suspended: u64,
    }

    impl Feed {
        fn new(config: IdleConfig) -> Self {
            Self {
                engine: IdleEngine::new(config),
                t: 1000,
                suspended: 0,
            }
        }

        fn step(&mut self, cpu: f64, gpu: Option<f64>, gates: Vec<Gate>) -> Verdict {
            self.t += 1;
            self.engine.observe(Observation {
                monotonic: Duration::from_secs(self.t),
                boottime: Duration::from_secs(self.t + self.suspended),
                cpu: Some(cpu),
                gpu,
                gates,
            })
        }

        fn run(&mut self, seconds: u64, cpu: f64) -> Verdict {
            let mut last = None;
            for _ in 0..seconds {
                last = Some(self.step(cpu, None, vec![]));
            }
            last.unwrap()
        }
    }

    #[test]
    fn warms_up_for_one_window_then_decides() {
        let mut f = Feed::new(config());
        // Observations at 1 s steps span the 10 s window at the 11th.
        for _ in 0..10 {
            assert_eq!(f.step(0.01, None, vec![]).state, IdleState::WarmingUp);
        }
        let v = f.step(0.01, None, vec![]);
        assert_eq!(v.state, IdleState::Idle);
        assert_eq!(v.idle_for, Duration::ZERO);
        let mut busy = Feed::new(config());
        assert_eq!(busy.run(11, 0.5).state, IdleState::Active);
    }

    #[test]
    fn idle_seconds_grow_and_suspend_ready_after_the_timeout() {
        let mut f = Feed::new(config());
        f.run(11, 0.02);
        let v = f.run(59, 0.02);
        assert_eq!(v.idle_for, Duration::from_secs(59));
        assert!(!v.suspend_ready);
        let v = f.run(1, 0.02);
        assert_eq!(v.idle_for, Duration::from_secs(60));
        assert!(v.suspend_ready);
        assert_eq!(v.threshold, Duration::from_secs(60));
        assert!((v.cpu_idle_pct.unwrap() - 98.0).abs() < 1e-9);
    }

    #[test]
    fn short_peaks_do_not_flap_it_and_sustained_load_ends_it() {
        let mut f = Feed::new(config());
        f.run(20, 0.02);
        // A 1 s spike to 100 %: the window's mean rises to ~0.109, above the 0.10 threshold but
        // not above threshold + hysteresis (0.12): still idle.
        let v = f.step(1.0, None, vec![]);
        assert_eq!(v.state, IdleState::Idle);
        let before = v.idle_for;
        let v = f.run(3, 0.02);
        assert_eq!(v.state, IdleState::Idle);
        assert!(v.idle_for > before, "the timer kept running");
        // Sustained load: active, timer reset.
        let v = f.run(5, 0.6);
        assert_eq!(v.state, IdleState::Active);
        assert_eq!(v.idle_for, Duration::ZERO);
    }

    #[test]
    fn thresholds_at_the_edge() {
        // Values exact in binary, so the mean of equal readings is exactly the reading.
        let edge = || IdleConfig {
            cpu_idle_threshold: 0.25,
            hysteresis: 0.125,
            ..config()
        };
        // Exactly at the threshold is not idle; just below is.
        let mut at = Feed::new(edge());
        assert_eq!(at.run(11, 0.25).state, IdleState::Active);
        let mut below = Feed::new(edge());
        assert_eq!(below.run(11, 0.2499).state, IdleState::Idle);
        // Once idle, a mean between threshold and threshold + hysteresis keeps it idle ...
        assert_eq!(below.run(20, 0.375).state, IdleState::Idle);
        // ... and above threshold + hysteresis ends it.
        assert_eq!(below.run(20, 0.4).state, IdleState::Active);
        // Coming back needs the mean below the threshold again, not below threshold + h.
        assert_eq!(below.run(20, 0.3).state, IdleState::Active);
        assert_eq!(below.run(20, 0.1).state, IdleState::Idle);
    }

    #[test]
    fn a_gpu_starting_work_ends_idleness_at_once() {
        let mut f = Feed::new(config());
        f.run(80, 0.01);
        let v = f.step(0.01, Some(0.7), vec![]);
        assert_eq!(v.state, IdleState::Active);
        assert!(!v.suspend_ready);
        // ... and the window's low mean does not bring it back while the GPU works.
        for _ in 0..5 {
            assert_eq!(f.step(0.01, Some(0.7), vec![]).state, IdleState::Active);
        }
    }

    #[test]
    fn a_busy_gpu_keeps_the_host_active() {
        let mut f = Feed::new(config());
        for _ in 0..11 {
            f.step(0.01, Some(0.8), vec![]);
        }
        assert_eq!(f.step(0.01, Some(0.8), vec![]).state, IdleState::Active);
        let mut quiet = Feed::new(config());
        let mut v = None;
        for _ in 0..11 {
            v = Some(quiet.step(0.01, Some(0.0), vec![]));
        }
        let v = v.unwrap();
        assert_eq!(v.state, IdleState::Idle);
        assert_eq!(v.gpu_idle_pct, Some(100.0));
    }

    #[test]
    fn a_gate_blocks_readiness_and_holds_the_timer_at_zero() {
        let mut f = Feed::new(config());
        assert!(f.run(80, 0.01).suspend_ready);
        let gate = Gate {
            kind: GateKind::Inhibitor,
            detail: "inhibitor: backup (copying)".into(),
        };
        let v = f.step(0.01, None, vec![gate.clone()]);
        assert_eq!(v.state, IdleState::Idle, "CPU and GPU are still quiet");
        assert_eq!(v.idle_for, Duration::ZERO);
        assert!(!v.suspend_ready);
        assert_eq!(v.gates, [gate]);
        // Once the gate is gone, a whole timeout must pass again.
        assert!(!f.run(59, 0.01).suspend_ready);
        assert!(f.run(1, 0.01).suspend_ready);
    }

    #[test]
    fn a_resume_starts_warming_up_again() {
        let mut f = Feed::new(config());
        let v = f.run(80, 0.01);
        assert!(v.suspend_ready);
        // Eight hours asleep: boottime runs ahead of monotonic.
        f.suspended += 8 * 3600;
        let v = f.step(0.01, None, vec![]);
        assert!(v.resumed);
        assert_eq!(v.state, IdleState::WarmingUp);
        assert!(!v.suspend_ready);
        assert_eq!(v.idle_for, Duration::ZERO);
        // A just-woken host is not put back to sleep before a full timeout.
        assert!(!f.run(60, 0.01).suspend_ready);
        assert!(f.run(10, 0.01).suspend_ready);
    }

    #[test]
    fn wall_clock_jumps_do_not_matter_and_monotonic_going_back_restarts() {
        // The engine never sees the wall clock; a monotonic reading that goes back (a bug
        // somewhere) makes it start over instead of computing negative durations.
        let mut engine = IdleEngine::new(config());
        let at = |s: u64| Observation {
            monotonic: Duration::from_secs(s),
            boottime: Duration::from_secs(s),
            cpu: Some(0.01),
            ..Observation::default()
        };
        for s in 0..80 {
            engine.observe(at(s));
        }
        assert!(engine.observe(at(80)).suspend_ready);
        let v = engine.observe(at(5));
        assert_eq!(v.state, IdleState::WarmingUp);
        assert!(!v.resumed);
    }

    #[test]
    fn without_cpu_data_the_host_is_never_idle() {
        let mut engine = IdleEngine::new(config());
        let mut v = None;
        for s in 0..30 {
            v = Some(engine.observe(Observation {
                monotonic: Duration::from_secs(s),
                boottime: Duration::from_secs(s),
                ..Observation::default()
            }));
        }
        assert_eq!(v.unwrap().state, IdleState::Active);
    }

    #[test]
    fn config_problems() {
        let mut problems = Problems::default();
        IdleConfig {
            cpu_idle_threshold: 1.5,
            window_seconds: 1,
            gates: GatesConfig {
                processes: vec!["(".into()],
                load_above: Some(-1.0),
                ..GatesConfig::default()
            },
            ..IdleConfig::default()
        }
        .validate(&mut problems);
        let paths: Vec<String> = problems.into_vec().into_iter().map(|p| p.path).collect();
        assert_eq!(
            paths,
            [
                "idle.cpu_idle_threshold",
                "idle.window_seconds",
                "idle.gates.load_above",
                "idle.gates.processes[0]"
            ]
        );
    }
}
