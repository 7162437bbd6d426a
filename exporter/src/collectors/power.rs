//! `power`: the estimated power draw of the whole host and its energy counter.
//!
//! estimate = GPU watts + CPU watts + `power_estimation.baseline_watts`, where CPU watts come
//! from RAPL when every package is readable, and otherwise from CPU utilization times
//! `power_estimation.cpu_max_watts` (a linear model: good enough to compare hours, not to bill).
//! GPU watts are the sum of the GPUs' power draw from the `gpu` collector (0 without NVML or with
//! the collector off). The energy counter integrates the estimate
//! over monotonic time, so time spent suspended adds nothing.

use std::fmt;
use std::time::Instant;

use prometheus_client::encoding::DescriptorEncoder;
use serde::Deserialize;

use super::cpu::CpuSample;
use super::gpu::GpuSample;
use super::rapl::RaplSample;
use super::{Collector, CollectorError, EncodeSample, Latest};
use crate::metrics::{counter, gauge};
use aistack_common::config::Problems;

/// `power_estimation:` in the config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PowerEstimationConfig {
    /// Watts drawn by everything that is not measured (board, disks, fans, PSU losses), added
    /// to the GPU and CPU watts. Default 30.
    pub baseline_watts: f64,
    /// CPU watts at 100 % utilization, used only when RAPL is unavailable; the CPU's TDP is a
    /// fair value. Default 65.
    pub cpu_max_watts: f64,
}

impl Default for PowerEstimationConfig {
    fn default() -> Self {
        Self {
            baseline_watts: 30.0,
            cpu_max_watts: 65.0,
        }
    }
}

impl PowerEstimationConfig {
    /// Checks that every wattage is a finite, non-negative number.
    pub fn validate(&self, problems: &mut Problems) {
        for (key, value) in [
            ("baseline_watts", self.baseline_watts),
            ("cpu_max_watts", self.cpu_max_watts),
        ] {
            problems.check(
                value.is_finite() && value >= 0.0,
                format!("power_estimation.{key}"),
                format!("must be a number of watts >= 0, got {value}"),
            );
        }
    }
}

/// Where the CPU part of the estimate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuPowerSource {
    /// Measured by RAPL.
    Rapl,
    /// Modelled from utilization (RAPL absent or unreadable).
    Utilization,
}

/// The parts of one estimate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PowerEstimate {
    /// GPU watts (0 without NVML).
    pub gpu_watts: f64,
    /// CPU watts.
    pub cpu_watts: f64,
    /// Where `cpu_watts` came from.
    pub cpu_source: CpuPowerSource,
    /// The configured baseline.
    pub baseline_watts: f64,
}

impl PowerEstimate {
    /// The host estimate.
    pub fn total_watts(&self) -> f64 {
        self.gpu_watts + self.cpu_watts + self.baseline_watts
    }
}

/// Combines the inputs; `None` while neither RAPL power nor CPU utilization is known yet.
pub fn estimate(
    config: &PowerEstimationConfig,
    rapl_watts: Option<f64>,
    cpu_utilization: Option<f64>,
    gpu_watts: f64,
) -> Option<PowerEstimate> {
    let (cpu_watts, cpu_source) = match (rapl_watts, cpu_utilization) {
        (Some(watts), _) => (watts, CpuPowerSource::Rapl),
        (None, Some(utilization)) => (
            utilization.clamp(0.0, 1.0) * config.cpu_max_watts,
            CpuPowerSource::Utilization,
        ),
        (None, None) => return None,
    };
    Some(PowerEstimate {
        gpu_watts,
        cpu_watts,
        cpu_source,
        baseline_watts: config.baseline_watts,
    })
}

/// One `power` sample.
#[derive(Debug, Clone, PartialEq)]
pub struct PowerSample {
    /// The estimate now.
    pub estimate: PowerEstimate,
    /// The estimate integrated over time since the exporter started.
    pub energy_joules: f64,
}

impl EncodeSample for PowerSample {
    fn encode(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        gauge(
            encoder,
            "host_power_estimated",
            "Estimated host power: GPU watts + CPU watts (RAPL, or modelled from utilization) + the configured baseline.",
            Some("watts"),
            self.estimate.total_watts(),
        )?;
        counter(
            encoder,
            "host_energy_estimated",
            "The host power estimate integrated over time since the exporter started.",
            Some("joules"),
            self.energy_joules,
        )
    }
}

/// Estimates host power from the other collectors' latest samples.
#[derive(Debug)]
pub struct PowerCollector {
    config: PowerEstimationConfig,
    cpu: Latest<CpuSample>,
    rapl: Latest<RaplSample>,
    gpu: Latest<GpuSample>,
    energy_joules: f64,
    last: Option<(Instant, f64)>,
}

impl PowerCollector {
    /// Reads the `cpu`, `rapl` and `gpu` collectors' channels.
    pub fn new(
        config: PowerEstimationConfig,
        cpu: Latest<CpuSample>,
        rapl: Latest<RaplSample>,
        gpu: Latest<GpuSample>,
    ) -> Self {
        Self {
            config,
            cpu,
            rapl,
            gpu,
            energy_joules: 0.0,
            last: None,
        }
    }

    /// Adds `watts` at `now` to the energy counter (trapezoid rule).
    fn integrate(&mut self, watts: f64, now: Instant) -> f64 {
        if let Some((at, previous)) = self.last
            && let Some(elapsed) = now.checked_duration_since(at)
        {
            self.energy_joules += (previous + watts) / 2.0 * elapsed.as_secs_f64();
        }
        self.last = Some((now, watts));
        self.energy_joules
    }
}

impl Collector for PowerCollector {
    type Sample = PowerSample;

    async fn sample(&mut self, now: Instant) -> Result<PowerSample, CollectorError> {
        let rapl_watts = self
            .rapl
            .borrow()
            .sample
            .as_ref()
            .and_then(|s| s.cpu_watts());
        let utilization = self
            .cpu
            .borrow()
            .sample
            .as_ref()
            .and_then(|s| s.utilization);
        let gpu_watts = self
            .gpu
            .borrow()
            .sample
            .as_ref()
            .map_or(0.0, |s| s.power_watts());
        let estimate =
            estimate(&self.config, rapl_watts, utilization, gpu_watts).ok_or_else(|| {
                CollectorError::NoData("waiting for RAPL power or CPU utilization".into())
            })?;
        let energy_joules = self.integrate(estimate.total_watts(), now);
        Ok(PowerSample {
            estimate,
            energy_joules,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::collectors::rapl::PackagePower;
    use crate::collectors::{Snapshot, channel};

    #[test]
    fn rapl_wins_over_the_utilization_model() {
        let config = PowerEstimationConfig::default();
        let e = estimate(&config, Some(42.0), Some(0.5), 0.0).unwrap();
        assert_eq!((e.cpu_watts, e.cpu_source), (42.0, CpuPowerSource::Rapl));
        assert_eq!(e.total_watts(), 72.0);

        let e = estimate(&config, None, Some(0.5), 100.0).unwrap();
        assert_eq!(
            (e.cpu_watts, e.cpu_source),
            (32.5, CpuPowerSource::Utilization)
        );
        assert_eq!(e.total_watts(), 162.5);

        assert_eq!(estimate(&config, None, None, 0.0), None);
    }

    #[tokio::test]
    async fn energy_integrates_the_estimate_over_time() {
        let (cpu_tx, cpu_rx) = channel::<CpuSample>();
        let (rapl_tx, rapl_rx) = channel::<RaplSample>();
        let (_gpu_tx, gpu_rx) = channel::<GpuSample>();
        let mut power =
            PowerCollector::new(PowerEstimationConfig::default(), cpu_rx, rapl_rx, gpu_rx);
        let t0 = Instant::now();

        let err = power.sample(t0).await.unwrap_err();
        assert!(err.is_no_data());

        let publish = |watts: f64| {
            rapl_tx.send_replace(Snapshot {
                sample: Some(Arc::new(RaplSample {
                    packages: vec![PackagePower {
                        package: "0".into(),
                        energy_joules: 0.0,
                        watts: Some(watts),
                    }],
                })),
                status: None,
            });
        };
        publish(10.0);
        assert_eq!(power.sample(t0).await.unwrap().energy_joules, 0.0);
        publish(30.0);
        // (40 W + 60 W) / 2 over 2 s
        let s = power.sample(t0 + Duration::from_secs(2)).await.unwrap();
        assert_eq!(s.estimate.total_watts(), 60.0);
        assert_eq!(s.energy_joules, 100.0);

        // RAPL gone: the utilization model takes over and the counter keeps growing.
        rapl_tx.send_replace(Snapshot::default());
        cpu_tx.send_replace(Snapshot {
            sample: Some(Arc::new(CpuSample {
                utilization: Some(0.2),
            })),
            status: None,
        });
        let s = power.sample(t0 + Duration::from_secs(3)).await.unwrap();
        assert_eq!(s.estimate.cpu_source, CpuPowerSource::Utilization);
        assert_eq!(s.estimate.total_watts(), 43.0);
        assert_eq!(s.energy_joules, 100.0 + (60.0 + 43.0) / 2.0);
    }

    #[test]
    fn negative_or_infinite_watts_are_config_problems() {
        let mut problems = Problems::default();
        PowerEstimationConfig {
            baseline_watts: -1.0,
            cpu_max_watts: f64::INFINITY,
        }
        .validate(&mut problems);
        let paths: Vec<String> = problems.into_vec().into_iter().map(|p| p.path).collect();
        assert_eq!(
            paths,
            [
                "power_estimation.baseline_watts",
                "power_estimation.cpu_max_watts"
            ]
        );
    }
}
