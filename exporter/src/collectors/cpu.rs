//! `cpu`: the busy share of all CPUs, from deltas of the aggregate `cpu` line of /proc/stat.
//!
//! busy = user + nice + system + irq + softirq + steal; idle = idle + iowait. Guest time is
//! already inside user and nice, so it is not added again.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use procfs_core::{FromReadSI, KernelStats, ProcResult};
use prometheus_client::encoding::DescriptorEncoder;

use super::{Collector, CollectorError, EncodeSample, blocking, system_info};
use crate::metrics::gauge;

/// Aggregate CPU ticks since boot, split into busy and total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTicks {
    /// Ticks spent doing work.
    pub busy: u64,
    /// All ticks (busy + idle + iowait).
    pub total: u64,
}

/// Parses /proc/stat text into aggregate ticks.
pub fn parse_stat(text: &str) -> ProcResult<CpuTicks> {
    // Ticks cancel out in a ratio.
    let stats = KernelStats::from_read(text.as_bytes(), &system_info())?;
    let t = stats.total;
    let idle = t.idle.saturating_add(t.iowait.unwrap_or(0));
    let busy = [
        t.user,
        t.nice,
        t.system,
        t.irq.unwrap_or(0),
        t.softirq.unwrap_or(0),
        t.steal.unwrap_or(0),
    ]
    .into_iter()
    .fold(0u64, u64::saturating_add);
    Ok(CpuTicks {
        busy,
        total: busy.saturating_add(idle),
    })
}

/// Busy share between two readings, 0..1; `None` when no time passed or a counter went
/// backwards (CPU hot-unplug, iowait's documented decreases), which re-primes the delta.
pub fn utilization(previous: CpuTicks, current: CpuTicks) -> Option<f64> {
    let total = current.total.checked_sub(previous.total)?;
    let busy = current.busy.checked_sub(previous.busy)?;
    let idle_now = current.total.checked_sub(current.busy)?;
    let idle_before = previous.total.checked_sub(previous.busy)?;
    idle_now.checked_sub(idle_before)?;
    if total == 0 {
        return None;
    }
    Some((busy as f64 / total as f64).clamp(0.0, 1.0))
}

/// One `cpu` sample.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuSample {
    /// Busy share since the previous sample; `None` on the first sample and after a counter
    /// reset.
    pub utilization: Option<f64>,
}

impl EncodeSample for CpuSample {
    fn encode(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let Some(utilization) = self.utilization else {
            return Ok(());
        };
        gauge(
            encoder,
            "cpu_utilization",
            "Busy share of all CPUs over the last sample interval, 0..1.",
            Some("ratio"),
            utilization,
        )
    }
}

/// Samples /proc/stat under a procfs root.
#[derive(Debug)]
pub struct CpuCollector {
    stat: PathBuf,
    previous: Option<CpuTicks>,
}

impl CpuCollector {
    /// Reads `<procfs>/stat`.
    pub fn new(procfs: &Path) -> Self {
        Self {
            stat: procfs.join("stat"),
            previous: None,
        }
    }

    /// Advances the delta with a new reading.
    pub fn update(&mut self, current: CpuTicks) -> CpuSample {
        let utilization = self.previous.and_then(|p| utilization(p, current));
        self.previous = Some(current);
        CpuSample { utilization }
    }
}

impl Collector for CpuCollector {
    type Sample = CpuSample;

    async fn sample(&mut self, _now: Instant) -> Result<CpuSample, CollectorError> {
        let path = self.stat.clone();
        let text = blocking(move || {
            std::fs::read_to_string(&path).map_err(|e| CollectorError::read(&path, e))
        })
        .await?;
        let ticks = parse_stat(&text).map_err(|err| CollectorError::parse(&self.stat, err))?;
        Ok(self.update(ticks))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  100 20 30 800 50 5 5 10 40 0\n\
        cpu0 50 10 15 400 25 2 3 5 20 0\n\
        cpu1 50 10 15 400 25 3 2 5 20 0\n\
        intr 12345 0 0\nctxt 999\nbtime 1700000000\nprocesses 42\n\
        procs_running 1\nprocs_blocked 0\nsoftirq 1 2 3\n";

    #[test]
    fn parses_the_aggregate_line() {
        // busy = 100 + 20 + 30 + 5 + 5 + 10 (guest 40 is inside user already)
        assert_eq!(
            parse_stat(STAT).unwrap(),
            CpuTicks {
                busy: 170,
                total: 1020
            }
        );
    }

    #[test]
    fn old_kernels_without_optional_columns_parse() {
        let text = "cpu  100 0 100 800\nctxt 1\nbtime 1\nprocesses 1\n";
        assert_eq!(
            parse_stat(text).unwrap(),
            CpuTicks {
                busy: 200,
                total: 1000
            }
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for text in [
            "",
            "cpu",
            "cpu  a b c d",
            "cpu  1 2 3\n",
            "\0\0\0",
            "cpu  99999999999999999999999 0 0 0\nctxt 1\nbtime 1\nprocesses 1\n",
        ] {
            assert!(parse_stat(text).is_err(), "{text:?}");
        }
    }

    #[test]
    fn mutated_stat_files_never_panic() {
        // Every truncation and single-byte corruption of a real file: an error or a value.
        let bytes = STAT.as_bytes();
        for cut in 0..bytes.len() {
            let _ = parse_stat(&String::from_utf8_lossy(&bytes[..cut]));
            for replacement in [b'\0', b' ', b'\n', b'-', b'9', 0xff] {
                let mut mutated = bytes.to_vec();
                mutated[cut] = replacement;
                let _ = parse_stat(&String::from_utf8_lossy(&mutated));
            }
        }
    }

    #[test]
    fn utilization_from_deltas() {
        let a = CpuTicks {
            busy: 100,
            total: 1000,
        };
        let b = CpuTicks {
            busy: 150,
            total: 1200,
        };
        assert_eq!(utilization(a, b), Some(0.25));
        let all_busy = CpuTicks {
            busy: 300,
            total: 1200 + 150,
        };
        assert_eq!(utilization(b, all_busy), Some(1.0));
    }

    #[test]
    fn no_time_or_counters_going_backwards_give_no_value() {
        let a = CpuTicks {
            busy: 100,
            total: 1000,
        };
        assert_eq!(utilization(a, a), None);
        assert_eq!(
            utilization(
                a,
                CpuTicks {
                    busy: 90,
                    total: 1100
                }
            ),
            None
        );
        // idle (total - busy) went backwards although total grew
        assert_eq!(
            utilization(
                a,
                CpuTicks {
                    busy: 200,
                    total: 1050
                }
            ),
            None
        );
        assert_eq!(
            utilization(
                a,
                CpuTicks {
                    busy: 50,
                    total: 500
                }
            ),
            None
        );
    }

    #[test]
    fn first_sample_primes_and_second_reports() {
        let mut cpu = CpuCollector::new(Path::new("/nonexistent"));
        assert_eq!(
            cpu.update(CpuTicks {
                busy: 0,
                total: 100
            })
            .utilization,
            None
        );
        assert_eq!(
            cpu.update(CpuTicks {
                busy: 50,
                total: 200
            })
            .utilization,
            Some(0.5)
        );
        // A reset re-primes: nothing now, a value again next time.
        assert_eq!(
            cpu.update(CpuTicks {
                busy: 10,
                total: 20
            })
            .utilization,
            None
        );
        assert_eq!(
            cpu.update(CpuTicks {
                busy: 20,
                total: 40
            })
            .utilization,
            Some(0.5)
        );
    }

    #[tokio::test]
    async fn missing_proc_is_no_data() {
        let dir = tempfile::tempdir().unwrap();
        let err = CpuCollector::new(dir.path())
            .sample(Instant::now())
            .await
            .unwrap_err();
        assert!(err.is_no_data(), "{err}");
    }
}
