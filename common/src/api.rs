//! The exporter's JSON API, typed once for both sides: the exporter serves these, the actioner
//! reads them for its re-checks at action time (suspend reads `/api/v1/idle`, failback
//! `/api/v1/gpu`). Nothing parses `/metrics` text to decide anything.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Where the exporter serves the idle engine's verdict.
pub const IDLE_PATH: &str = "/api/v1/idle";
/// Where the exporter serves the GPUs' host-workload state.
pub const GPU_PATH: &str = "/api/v1/gpu";

/// The idle engine's states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdleState {
    /// The window has not filled since start or resume.
    WarmingUp,
    /// Something is going on.
    Active,
    /// Below every threshold.
    Idle,
}

impl IdleState {
    /// Every state, in the order the metrics list them.
    pub const ALL: [IdleState; 3] = [Self::WarmingUp, Self::Active, Self::Idle];

    /// The name in the API and the `state` label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::WarmingUp => "warming_up",
            Self::Active => "active",
            Self::Idle => "idle",
        }
    }
}

impl fmt::Display for IdleState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `GET /api/v1/idle`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdleReport {
    /// The idle engine's state.
    pub state: IdleState,
    /// Seconds idle (0 unless idle).
    pub idle_for_s: u64,
    /// `idle.idle_timeout_seconds`.
    pub threshold_s: u64,
    /// CPU idle share over the window, percent; `null` while unknown (no CPU reading yet).
    pub cpu_idle_pct: Option<f64>,
    /// Idle share of the busiest GPU over the window, percent; `null` while unknown (no GPU
    /// reading: NVML down, or no GPU).
    pub gpu_idle_pct: Option<f64>,
    /// Whether the host may be suspended now.
    pub suspend_ready: bool,
    /// Why not, gate by gate.
    #[serde(default)]
    pub gating_reasons: Vec<String>,
}

impl IdleReport {
    /// Why this host may not be suspended now, or `None` when it may.
    pub fn not_ready_because(&self) -> Option<String> {
        if self.suspend_ready {
            None
        } else if self.gating_reasons.is_empty() {
            Some(format!("state {}", self.state))
        } else {
            Some(self.gating_reasons.join("; "))
        }
    }
}

/// `GET /api/v1/gpu`: what the GPU collector last saw, for decisions that need the GPU free.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuReport {
    /// NVML loaded and answered at the last sample.
    pub nvml_up: bool,
    /// Seconds since the last successful sample; `None` before the first.
    pub sample_age_s: Option<f64>,
    /// Seconds between two samples of the GPU collector (`collectors.gpu.interval`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_s: Option<f64>,
    /// Every GPU of the last successful sample (none when `nvml_up` is false).
    pub gpus: Vec<GpuState>,
}

/// One GPU in a [`GpuReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuState {
    /// NVML index, as in the `gpu` label.
    pub gpu: u32,
    /// `GPU-...`.
    pub uuid: String,
    /// Product name.
    pub name: String,
    /// Whether a process that is no inference service (a game) holds memory on it: the
    /// `aistack_gpu_host_workload_active` series.
    pub host_workload_active: bool,
    /// Names of those processes, for people.
    #[serde(default)]
    pub host_workload_processes: Vec<String>,
    /// Whether it answers NVML; `false` for a GPU seen earlier that stopped answering (fallen
    /// off the bus, unplugged). Exporters before 0.2 list only answering GPUs.
    #[serde(default = "answering")]
    pub up: bool,
}

fn answering() -> bool {
    true
}

/// The oldest GPU sample that still counts as evidence: this, or three sampling intervals
/// when the collector samples more slowly.
pub const GPU_SAMPLE_MAX_AGE_S: f64 = 30.0;

impl GpuReport {
    /// Positive evidence that no host workload holds any GPU: NVML answers, the sample is
    /// fresh, there is at least one GPU and none has host workload. Anything short of that is
    /// an `Err` saying what is missing — never "free" by default.
    pub fn confirm_free(&self) -> Result<(), String> {
        if !self.nvml_up {
            return Err("NVML is down on the exporter: the GPU cannot be seen".into());
        }
        match self.sample_age_s {
            None => return Err("the exporter has no GPU sample yet".into()),
            Some(age)
                if age.is_nan()
                    || age > GPU_SAMPLE_MAX_AGE_S.max(3.0 * self.interval_s.unwrap_or(0.0)) =>
            {
                return Err(format!("the exporter's last GPU sample is {age:.0}s old"));
            }
            Some(_) => {}
        }
        if self.gpus.iter().all(|g| !g.up) {
            return Err("the exporter sees no GPU".into());
        }
        let lost: Vec<String> = self
            .gpus
            .iter()
            .filter(|g| !g.up)
            .map(|g| format!("GPU {} ({})", g.gpu, g.uuid))
            .collect();
        if !lost.is_empty() {
            return Err(format!("{} stopped answering", lost.join(", ")));
        }
        let busy: Vec<String> = self
            .gpus
            .iter()
            .filter(|g| g.host_workload_active)
            .map(|g| {
                if g.host_workload_processes.is_empty() {
                    format!("GPU {}", g.gpu)
                } else {
                    format!("GPU {} ({})", g.gpu, g.host_workload_processes.join(", "))
                }
            })
            .collect();
        if busy.is_empty() {
            Ok(())
        } else {
            Err(format!("host workload still holds {}", busy.join(", ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(busy: bool) -> GpuState {
        GpuState {
            gpu: 0,
            uuid: "GPU-1".into(),
            name: "RTX".into(),
            host_workload_active: busy,
            host_workload_processes: if busy { vec!["steam".into()] } else { vec![] },
            up: true,
        }
    }

    #[test]
    fn only_positive_evidence_says_the_gpu_is_free() {
        let free = GpuReport {
            nvml_up: true,
            sample_age_s: Some(1.0),
            interval_s: Some(1.0),
            gpus: vec![gpu(false)],
        };
        // A collector that samples every minute: a 90 s old sample still counts.
        let slow = GpuReport {
            sample_age_s: Some(90.0),
            interval_s: Some(60.0),
            ..free.clone()
        };
        assert_eq!(slow.confirm_free(), Ok(()));
        assert_eq!(free.confirm_free(), Ok(()));
        let busy = GpuReport {
            gpus: vec![
                gpu(false),
                GpuState {
                    gpu: 1,
                    ..gpu(true)
                },
            ],
            ..free.clone()
        };
        assert_eq!(
            busy.confirm_free().unwrap_err(),
            "host workload still holds GPU 1 (steam)"
        );
        for unseen in [
            GpuReport {
                nvml_up: false,
                ..free.clone()
            },
            GpuReport {
                sample_age_s: None,
                ..free.clone()
            },
            GpuReport {
                sample_age_s: Some(31.0),
                ..free.clone()
            },
            GpuReport {
                sample_age_s: Some(f64::NAN),
                ..free.clone()
            },
            GpuReport {
                gpus: vec![],
                ..free.clone()
            },
            GpuReport {
                gpus: vec![GpuState {
                    up: false,
                    ..gpu(false)
                }],
                ..free.clone()
            },
        ] {
            assert!(unseen.confirm_free().is_err(), "{unseen:?}");
        }
    }

    #[test]
    fn a_lost_gpu_is_no_evidence_of_a_free_one() {
        let report = GpuReport {
            nvml_up: true,
            sample_age_s: Some(1.0),
            interval_s: Some(1.0),
            gpus: vec![
                gpu(false),
                GpuState {
                    gpu: 1,
                    uuid: "GPU-2".into(),
                    up: false,
                    ..gpu(false)
                },
            ],
        };
        assert_eq!(
            report.confirm_free().unwrap_err(),
            "GPU 1 (GPU-2) stopped answering"
        );
        // What a 0.1 exporter sends: no `up`, so every listed GPU answers.
        let old: GpuState = serde_json::from_str(
            r#"{"gpu":0,"uuid":"GPU-1","name":"RTX","host_workload_active":false}"#,
        )
        .unwrap();
        assert!(old.up);
    }

    #[test]
    fn the_idle_report_reads_what_the_exporter_writes() {
        let text = r#"{"state":"idle","idle_for_s":1900,"threshold_s":1800,"cpu_idle_pct":98.2,"gpu_idle_pct":100.0,"suspend_ready":false,"gating_reasons":["inhibitor: Steam (Downloading)"]}"#;
        let report: IdleReport = serde_json::from_str(text).unwrap();
        assert_eq!(report.state, IdleState::Idle);
        assert_eq!(
            report.not_ready_because().as_deref(),
            Some("inhibitor: Steam (Downloading)")
        );
        assert_eq!(serde_json::to_string(&report).unwrap(), text);
    }
}
