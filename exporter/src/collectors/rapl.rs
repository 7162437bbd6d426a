//! `rapl`: CPU package energy and power from the powercap RAPL zones under
//! `<sysfs>/class/powercap`.
//!
//! Only top-level `intel-rapl:N` zones named `package-N` are read (AMD Zen exposes the same
//! interface). Sub-zones (core, uncore, dram) are parts of a package, `psys` covers the whole
//! platform and `intel-rapl-mmio:N` duplicates a package through MMIO: adding any of them would
//! count energy twice.
//!
//! `energy_uj` wraps at `max_energy_range_uj`; the exported counter adds wrap-corrected deltas
//! to the first reading, so it only ever grows. Since Linux 5.10 `energy_uj` is readable by root
//! only (CVE-2020-8694): an unreadable zone is "no data", not an error.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};

use super::{Collector, CollectorError, EncodeSample, blocking};
use crate::metrics::{counter_family, gauge_family};

/// What one read of a zone found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneReading {
    /// Directory name, e.g. `intel-rapl:0`; identifies the zone between samples.
    pub zone: String,
    /// Package label, e.g. `0` for a zone named `package-0`.
    pub package: String,
    /// `energy_uj`.
    pub energy_uj: u64,
    /// `max_energy_range_uj`, where readable.
    pub max_energy_range_uj: Option<u64>,
}

/// The id of a top-level RAPL zone from its powercap directory name, `None` for anything
/// else. The kernel names zones `"%s:%x"` (drivers/powercap/powercap_sys.c): package 10 is
/// `intel-rapl:a`, and a sub-zone appends another `:%x` (`intel-rapl:a:1`).
pub fn top_level_zone_id(dir_name: &str) -> Option<u32> {
    let id = dir_name.strip_prefix("intel-rapl:")?;
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(id, 16).ok()
}

/// Whether a powercap directory entry is a top-level RAPL zone (`intel-rapl:N`, N in hex).
pub fn is_top_level_zone(dir_name: &str) -> bool {
    top_level_zone_id(dir_name).is_some()
}

/// The package label of a zone name: `package-0` -> `0`; `None` for other zones (`psys`).
pub fn package_label(zone_name: &str) -> Option<&str> {
    zone_name
        .trim()
        .strip_prefix("package-")
        .filter(|n| !n.is_empty())
}

/// Parses a sysfs counter file.
pub fn parse_u64(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// Reads every package zone under `powercap`. Zones that cannot be read are returned apart, with
/// why; a missing powercap directory is no data.
pub fn read_zones(
    powercap: &Path,
) -> Result<(Vec<ZoneReading>, Vec<CollectorError>), CollectorError> {
    let entries = std::fs::read_dir(powercap).map_err(|e| CollectorError::read(powercap, e))?;
    let mut zones = Vec::new();
    let mut skipped = Vec::new();
    for entry in entries.flatten() {
        let zone = entry.file_name().to_string_lossy().into_owned();
        if !is_top_level_zone(&zone) {
            continue;
        }
        match read_zone(&entry.path(), zone) {
            Ok(Some(reading)) => zones.push(reading),
            Ok(None) => {}
            Err(err) => skipped.push(err),
        }
    }
    // In zone id order (`intel-rapl:a` after `intel-rapl:9`); one series per package label:
    // a second zone naming the same package measures it again.
    zones.sort_by_key(|z| top_level_zone_id(&z.zone));
    let mut packages = std::collections::HashSet::new();
    zones.retain(|z| {
        let first = packages.insert(z.package.clone());
        if !first {
            tracing::debug!(collector = "rapl", zone = %z.zone, package = %z.package, "skipping a second zone for the same package");
        }
        first
    });
    Ok((zones, skipped))
}

/// What can be wrong with a zone's files.
#[derive(Debug, thiserror::Error)]
pub enum RaplError {
    /// `energy_uj` holds no unsigned integer.
    #[error("not a counter: {0:?}")]
    NotACounter(String),
}

fn read_zone(dir: &Path, zone: String) -> Result<Option<ZoneReading>, CollectorError> {
    let read = |file: &str| -> Result<String, CollectorError> {
        let path = dir.join(file);
        std::fs::read_to_string(&path).map_err(|e| CollectorError::read(&path, e))
    };
    let name = read("name")?;
    let Some(package) = package_label(&name) else {
        return Ok(None);
    };
    let energy_text = read("energy_uj")?;
    let energy_uj = parse_u64(&energy_text).ok_or_else(|| {
        let text = energy_text.trim().to_owned();
        CollectorError::parse(&dir.join("energy_uj"), RaplError::NotACounter(text))
    })?;
    let max_energy_range_uj = read("max_energy_range_uj")
        .ok()
        .as_deref()
        .and_then(parse_u64);
    Ok(Some(ZoneReading {
        zone,
        package: package.to_owned(),
        energy_uj,
        max_energy_range_uj,
    }))
}

/// A wrap-corrected energy counter for one zone.
#[derive(Debug, Clone)]
struct EnergyCounter {
    last_raw_uj: u64,
    total_uj: u64,
    at: Instant,
}

impl EnergyCounter {
    fn new(raw_uj: u64, at: Instant) -> Self {
        Self {
            last_raw_uj: raw_uj,
            total_uj: raw_uj,
            at,
        }
    }

    /// Adds the energy since the last reading and returns the average watts over that time.
    fn advance(&mut self, raw_uj: u64, max_range_uj: Option<u64>, at: Instant) -> Option<f64> {
        let delta_uj = wrapped_delta(self.last_raw_uj, raw_uj, max_range_uj);
        let seconds = at.checked_duration_since(self.at)?.as_secs_f64();
        self.last_raw_uj = raw_uj;
        self.total_uj = self.total_uj.saturating_add(delta_uj.unwrap_or(0));
        self.at = at;
        let delta_uj = delta_uj?;
        (seconds > 0.0).then(|| delta_uj as f64 / 1e6 / seconds)
    }
}

/// The energy between two raw readings of a counter that wraps at `max_range_uj`; `None` when
/// it cannot be known (went backwards without a known or plausible range).
pub fn wrapped_delta(previous: u64, current: u64, max_range_uj: Option<u64>) -> Option<u64> {
    if current >= previous {
        return Some(current - previous);
    }
    let max = max_range_uj.filter(|&max| max >= previous)?;
    // current < previous <= max, so this stays below max.
    Some(max - previous + current)
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PackageLabels {
    package: String,
}

/// Energy and power of one CPU package.
#[derive(Debug, Clone, PartialEq)]
pub struct PackagePower {
    /// Package label (`0`, `1`, ...).
    pub package: String,
    /// Wrap-corrected energy counter.
    pub energy_joules: f64,
    /// Average power since the previous sample; `None` on the first.
    pub watts: Option<f64>,
}

/// One `rapl` sample.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RaplSample {
    /// Every readable package zone.
    pub packages: Vec<PackagePower>,
}

impl RaplSample {
    /// Sum of the packages' power, when every package has a value.
    pub fn cpu_watts(&self) -> Option<f64> {
        if self.packages.is_empty() {
            return None;
        }
        self.packages.iter().map(|p| p.watts).sum()
    }
}

impl EncodeSample for RaplSample {
    fn encode(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let labels = |p: &PackagePower| PackageLabels {
            package: p.package.clone(),
        };
        counter_family(
            encoder,
            "cpu_package_energy",
            "Energy used by the CPU package, from RAPL, wrap-corrected.",
            Some("joules"),
            self.packages.iter().map(|p| (labels(p), p.energy_joules)),
        )?;
        gauge_family(
            encoder,
            "cpu_power",
            "Average power of the CPU package over the last sample interval, from RAPL.",
            Some("watts"),
            self.packages
                .iter()
                .filter_map(|p| Some((labels(p), p.watts?))),
        )
    }
}

/// Samples the RAPL zones under a sysfs root.
#[derive(Debug)]
pub struct RaplCollector {
    powercap: PathBuf,
    counters: BTreeMap<String, EnergyCounter>,
}

impl RaplCollector {
    /// Reads `<sysfs>/class/powercap`.
    pub fn new(sysfs: &Path) -> Self {
        Self {
            powercap: sysfs.join("class/powercap"),
            counters: BTreeMap::new(),
        }
    }

    /// Advances every zone's counter with new readings taken at `now`.
    pub fn update(&mut self, readings: &[ZoneReading], now: Instant) -> RaplSample {
        self.counters
            .retain(|zone, _| readings.iter().any(|r| &r.zone == zone));
        let packages = readings
            .iter()
            .map(|r| {
                let mut watts = None;
                let counter = self
                    .counters
                    .entry(r.zone.clone())
                    .and_modify(|c| watts = c.advance(r.energy_uj, r.max_energy_range_uj, now))
                    .or_insert_with(|| EnergyCounter::new(r.energy_uj, now));
                PackagePower {
                    package: r.package.clone(),
                    energy_joules: counter.total_uj as f64 / 1e6,
                    watts,
                }
            })
            .collect();
        RaplSample { packages }
    }
}

impl Collector for RaplCollector {
    type Sample = RaplSample;

    async fn sample(&mut self, now: Instant) -> Result<RaplSample, CollectorError> {
        let powercap = self.powercap.clone();
        let (readings, skipped) = blocking(move || read_zones(&powercap)).await?;
        for err in &skipped {
            tracing::debug!(collector = "rapl", reason = %err, "skipping RAPL zone");
        }
        if readings.is_empty() {
            return Err(match skipped.into_iter().find(|e| !e.is_no_data()) {
                Some(err) => err,
                None => CollectorError::NoData(format!(
                    "no readable RAPL package zone under {}",
                    self.powercap.display()
                )),
            });
        }
        Ok(self.update(&readings, now))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn reading(zone: &str, package: &str, energy_uj: u64, max: Option<u64>) -> ZoneReading {
        ZoneReading {
            zone: zone.into(),
            package: package.into(),
            energy_uj,
            max_energy_range_uj: max,
        }
    }

    #[test]
    fn zone_names() {
        assert!(is_top_level_zone("intel-rapl:0"));
        assert!(is_top_level_zone("intel-rapl:12"));
        assert_eq!(top_level_zone_id("intel-rapl:a"), Some(10));
        assert_eq!(top_level_zone_id("intel-rapl:1f"), Some(31));
        assert_eq!(top_level_zone_id("intel-rapl:10"), Some(16));
        assert!(!is_top_level_zone("intel-rapl:a:0"));
        assert!(!is_top_level_zone("intel-rapl:g"));
        assert!(!is_top_level_zone("intel-rapl:+1"));
        assert!(!is_top_level_zone("intel-rapl:0:1"));
        assert!(!is_top_level_zone("intel-rapl-mmio:0"));
        assert!(!is_top_level_zone("intel-rapl"));
        assert!(!is_top_level_zone("intel-rapl:"));
        assert_eq!(package_label("package-0\n"), Some("0"));
        assert_eq!(package_label("psys"), None);
        assert_eq!(package_label("package-"), None);
        assert_eq!(parse_u64("123456\n"), Some(123_456));
        assert_eq!(parse_u64("-1"), None);
        assert_eq!(parse_u64(""), None);
    }

    #[test]
    fn deltas_wrap_at_the_max_range() {
        assert_eq!(wrapped_delta(100, 250, Some(1000)), Some(150));
        assert_eq!(wrapped_delta(900, 100, Some(1000)), Some(200));
        // Went backwards with no range, or a range below the last value: unknowable.
        assert_eq!(wrapped_delta(900, 100, None), None);
        assert_eq!(wrapped_delta(900, 100, Some(500)), None);
        // Extreme values from a broken driver stay in range.
        assert_eq!(
            wrapped_delta(u64::MAX - 1, u64::MAX - 2, Some(u64::MAX)),
            Some(u64::MAX - 1)
        );
    }

    #[test]
    fn counter_survives_a_wrap_and_reports_watts() {
        let t0 = Instant::now();
        let max = Some(262_143_328_850);
        let mut rapl = RaplCollector::new(Path::new("/nonexistent"));

        let first = rapl.update(&[reading("intel-rapl:0", "0", 262_100_000_000, max)], t0);
        assert_eq!(first.packages[0].watts, None);
        assert_eq!(first.packages[0].energy_joules, 262_100.0);

        // 2 s later the counter wrapped: 43_328_850 uJ to the top, then 56_671_150 uJ.
        let t1 = t0 + Duration::from_secs(2);
        let second = rapl.update(&[reading("intel-rapl:0", "0", 56_671_150, max)], t1);
        let p = &second.packages[0];
        assert_eq!(p.energy_joules, 262_200.0);
        assert_eq!(p.watts, Some(50.0));
        assert_eq!(second.cpu_watts(), Some(50.0));
    }

    #[test]
    fn counter_going_backwards_without_range_is_held_not_subtracted() {
        let t0 = Instant::now();
        let mut rapl = RaplCollector::new(Path::new("/nonexistent"));
        rapl.update(&[reading("intel-rapl:0", "0", 5_000_000, None)], t0);
        let s = rapl.update(
            &[reading("intel-rapl:0", "0", 1_000_000, None)],
            t0 + Duration::from_secs(1),
        );
        assert_eq!(s.packages[0].energy_joules, 5.0);
        assert_eq!(s.packages[0].watts, None);
        let s = rapl.update(
            &[reading("intel-rapl:0", "0", 3_000_000, None)],
            t0 + Duration::from_secs(2),
        );
        assert_eq!(s.packages[0].energy_joules, 7.0);
        assert_eq!(s.packages[0].watts, Some(2.0));
    }

    #[test]
    fn cpu_watts_needs_every_package() {
        let mut sample = RaplSample {
            packages: vec![
                PackagePower {
                    package: "0".into(),
                    energy_joules: 1.0,
                    watts: Some(30.0),
                },
                PackagePower {
                    package: "1".into(),
                    energy_joules: 1.0,
                    watts: Some(12.5),
                },
            ],
        };
        assert_eq!(sample.cpu_watts(), Some(42.5));
        sample.packages[1].watts = None;
        assert_eq!(sample.cpu_watts(), None);
        assert_eq!(RaplSample::default().cpu_watts(), None);
    }

    #[test]
    fn reads_package_zones_and_skips_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let powercap = dir.path();
        let zone = |name: &str, files: &[(&str, &str)]| {
            let d = powercap.join(name);
            std::fs::create_dir_all(&d).unwrap();
            for (f, v) in files {
                std::fs::write(d.join(f), v).unwrap();
            }
        };
        zone(
            "intel-rapl:0",
            &[
                ("name", "package-0\n"),
                ("energy_uj", "1000\n"),
                ("max_energy_range_uj", "5000\n"),
            ],
        );
        zone(
            "intel-rapl:0:0",
            &[("name", "core\n"), ("energy_uj", "10\n")],
        );
        zone("intel-rapl:1", &[("name", "psys\n"), ("energy_uj", "10\n")]);
        zone(
            "intel-rapl-mmio:0",
            &[("name", "package-0\n"), ("energy_uj", "10\n")],
        );
        zone("intel-rapl:2", &[("name", "package-1\n")]); // energy_uj missing
        zone(
            "intel-rapl:3",
            &[("name", "package-2\n"), ("energy_uj", "lots\n")],
        );

        let (zones, skipped) = read_zones(powercap).unwrap();
        assert_eq!(zones, [reading("intel-rapl:0", "0", 1000, Some(5000))]);
        assert_eq!(skipped.len(), 2);
        assert!(skipped.iter().any(CollectorError::is_no_data));
        assert!(
            skipped
                .iter()
                .any(|e| matches!(e, CollectorError::Parse { .. }))
        );

        let err = read_zones(&powercap.join("absent")).unwrap_err();
        assert!(err.is_no_data());
    }

    /// A 12-socket host: the kernel names packages 10 and 11 `intel-rapl:a` and `intel-rapl:b`
    /// (and their sub-zones `intel-rapl:a:0`); every package counts, in id order, once.
    #[test]
    fn hex_zone_ids_count_and_a_package_is_read_once() {
        let dir = tempfile::tempdir().unwrap();
        let powercap = dir.path();
        for id in 0..12_u32 {
            let zone = powercap.join(format!("intel-rapl:{id:x}"));
            std::fs::create_dir_all(zone.join(format!("intel-rapl:{id:x}:0"))).unwrap();
            std::fs::write(zone.join("name"), format!("package-{id}\n")).unwrap();
            std::fs::write(zone.join("energy_uj"), format!("{}\n", 1000 + id)).unwrap();
            let sub = zone.join(format!("intel-rapl:{id:x}:0"));
            std::fs::write(sub.join("name"), "core\n").unwrap();
            std::fs::write(sub.join("energy_uj"), "7\n").unwrap();
            // The kernel's class directory links every zone and sub-zone at the top.
            std::os::unix::fs::symlink(&sub, powercap.join(format!("intel-rapl:{id:x}:0")))
                .unwrap();
        }
        // A second top-level zone claiming package 3 (a firmware quirk) adds nothing.
        let again = powercap.join("intel-rapl:c");
        std::fs::create_dir_all(&again).unwrap();
        std::fs::write(again.join("name"), "package-3\n").unwrap();
        std::fs::write(again.join("energy_uj"), "99\n").unwrap();

        let (zones, skipped) = read_zones(powercap).unwrap();
        assert!(skipped.is_empty(), "{skipped:?}");
        let seen: Vec<(&str, &str, u64)> = zones
            .iter()
            .map(|z| (z.zone.as_str(), z.package.as_str(), z.energy_uj))
            .collect();
        let want: Vec<(String, String, u64)> = (0..12_u32)
            .map(|id| {
                (
                    format!("intel-rapl:{id:x}"),
                    id.to_string(),
                    1000 + u64::from(id),
                )
            })
            .collect();
        let want: Vec<(&str, &str, u64)> = want
            .iter()
            .map(|(z, p, e)| (z.as_str(), p.as_str(), *e))
            .collect();
        assert_eq!(seen, want);
    }
}
