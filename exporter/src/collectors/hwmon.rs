//! `hwmon`: temperatures from the hardware monitor chips under `<sysfs>/class/hwmon`.
//!
//! `chip` is the chip's `name` (coretemp, k10temp, nvme, amdgpu, ...). When two chips share a
//! name (two NVMe drives), each gets its device's name appended (`nvme_nvme0`), else its hwmon
//! directory. `sensor` is `tempN_label` when the chip labels it uniquely, else `tempN`. A sensor
//! that fails to read (ENODATA and EIO are common while a device sleeps) is left out.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};

use super::{Collector, CollectorError, EncodeSample, blocking};
use crate::metrics::gauge_family;

/// One chip as read from sysfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChipReading {
    /// The hwmon directory name, e.g. `hwmon3`.
    pub dir: String,
    /// Contents of `name`, if present.
    pub name: Option<String>,
    /// Basename of the `device` link target (`0000:00:18.3`, `nvme0`), if present.
    pub device: Option<String>,
    /// Readable temperature inputs, by their index N in `tempN_input`.
    pub temps: BTreeMap<u32, TempReading>,
}

/// One temperature input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TempReading {
    /// `tempN_label`, if present.
    pub label: Option<String>,
    /// `tempN_input` in millidegrees Celsius.
    pub millicelsius: i64,
}

/// The index N of a `tempN_input` file name.
pub fn temp_input_index(file_name: &str) -> Option<u32> {
    file_name
        .strip_prefix("temp")?
        .strip_suffix("_input")?
        .parse()
        .ok()
}

/// Reads every chip under `hwmon`; a missing directory is no data.
pub fn read_chips(hwmon: &Path) -> Result<Vec<ChipReading>, CollectorError> {
    let entries = std::fs::read_dir(hwmon).map_err(|e| CollectorError::read(hwmon, e))?;
    let mut chips: Vec<ChipReading> = entries
        .flatten()
        .map(|entry| {
            read_chip(
                &entry.path(),
                entry.file_name().to_string_lossy().into_owned(),
            )
        })
        .collect();
    chips.sort_by(|a, b| natural_key(&a.dir).cmp(&natural_key(&b.dir)));
    Ok(chips)
}

fn natural_key(dir: &str) -> (u64, &str) {
    let n = dir.trim_start_matches("hwmon").parse().unwrap_or(u64::MAX);
    (n, dir)
}

fn read_chip(dir: &Path, dir_name: String) -> ChipReading {
    let read_trimmed = |path: PathBuf| {
        std::fs::read_to_string(path)
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    let mut temps = BTreeMap::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let file = entry.file_name();
        let Some(index) = temp_input_index(&file.to_string_lossy()) else {
            continue;
        };
        let input = read_trimmed(entry.path()).and_then(|v| v.parse::<i64>().ok());
        match input {
            Some(millicelsius) => {
                let label = read_trimmed(dir.join(format!("temp{index}_label")));
                temps.insert(
                    index,
                    TempReading {
                        label,
                        millicelsius,
                    },
                );
            }
            None => {
                tracing::debug!(collector = "hwmon", path = %entry.path().display(), "unreadable sensor skipped");
            }
        }
    }
    ChipReading {
        name: read_trimmed(dir.join("name")),
        device: std::fs::read_link(dir.join("device"))
            .ok()
            .and_then(|target| target.file_name().map(|n| n.to_string_lossy().into_owned())),
        dir: dir_name,
        temps,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TemperatureLabels {
    chip: String,
    sensor: String,
}

/// One temperature series.
#[derive(Debug, Clone, PartialEq)]
pub struct Temperature {
    /// Chip label.
    pub chip: String,
    /// Sensor label.
    pub sensor: String,
    /// Degrees Celsius.
    pub celsius: f64,
}

/// One `hwmon` sample.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HwmonSample {
    /// Every readable temperature.
    pub temperatures: Vec<Temperature>,
}

impl HwmonSample {
    /// Labels the readings: unique chip names, unique sensor names within a chip.
    pub fn from_chips(chips: &[ChipReading]) -> Self {
        let base = |c: &ChipReading| c.name.clone().unwrap_or_else(|| c.dir.clone());
        let mut name_count: HashMap<String, usize> = HashMap::new();
        for chip in chips {
            *name_count.entry(base(chip)).or_default() += 1;
        }
        let mut temperatures = Vec::new();
        let mut seen: HashSet<(String, String)> = HashSet::new();
        for chip in chips {
            let name = base(chip);
            let chip_label = if name_count[&name] > 1 {
                format!("{name}_{}", chip.device.as_deref().unwrap_or(&chip.dir))
            } else {
                name
            };
            let mut label_count: HashMap<&str, usize> = HashMap::new();
            for t in chip.temps.values() {
                if let Some(label) = &t.label {
                    *label_count.entry(label).or_default() += 1;
                }
            }
            for (index, t) in &chip.temps {
                let by_index = format!("temp{index}");
                let mut sensor = match &t.label {
                    Some(label) if label_count[label.as_str()] == 1 => label.clone(),
                    _ => by_index.clone(),
                };
                // Unique by construction: a label may repeat another sensor's index name
                // (`temp1_label` = "temp2"), and one device may register two chips.
                if seen.contains(&(chip_label.clone(), sensor.clone())) {
                    sensor = by_index;
                }
                let chip_label = if seen.contains(&(chip_label.clone(), sensor.clone())) {
                    format!("{chip_label}_{}", chip.dir)
                } else {
                    chip_label.clone()
                };
                if !seen.insert((chip_label.clone(), sensor.clone())) {
                    tracing::debug!(collector = "hwmon", chip = %chip_label, %sensor, "duplicate sensor skipped");
                    continue;
                }
                temperatures.push(Temperature {
                    chip: chip_label,
                    sensor,
                    celsius: t.millicelsius as f64 / 1000.0,
                });
            }
        }
        Self { temperatures }
    }
}

impl EncodeSample for HwmonSample {
    fn encode(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        gauge_family(
            encoder,
            "hwmon_temperature",
            "Temperature reported by a hardware monitor sensor.",
            Some("celsius"),
            self.temperatures.iter().map(|t| {
                let labels = TemperatureLabels {
                    chip: t.chip.clone(),
                    sensor: t.sensor.clone(),
                };
                (labels, t.celsius)
            }),
        )
    }
}

/// Samples the hwmon chips under a sysfs root.
#[derive(Debug)]
pub struct HwmonCollector {
    hwmon: PathBuf,
}

impl HwmonCollector {
    /// Reads `<sysfs>/class/hwmon`.
    pub fn new(sysfs: &Path) -> Self {
        Self {
            hwmon: sysfs.join("class/hwmon"),
        }
    }
}

impl Collector for HwmonCollector {
    type Sample = HwmonSample;

    async fn sample(&mut self, _now: Instant) -> Result<HwmonSample, CollectorError> {
        let hwmon = self.hwmon.clone();
        let chips = blocking(move || read_chips(&hwmon)).await?;
        let sample = HwmonSample::from_chips(&chips);
        if sample.temperatures.is_empty() {
            return Err(CollectorError::NoData(format!(
                "no readable temperature sensor under {}",
                self.hwmon.display()
            )));
        }
        Ok(sample)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chip(
        dir: &str,
        name: Option<&str>,
        device: Option<&str>,
        temps: &[(u32, Option<&str>, i64)],
    ) -> ChipReading {
        ChipReading {
            dir: dir.into(),
            name: name.map(Into::into),
            device: device.map(Into::into),
            temps: temps
                .iter()
                .map(|(i, l, v)| {
                    (
                        *i,
                        TempReading {
                            label: l.map(Into::into),
                            millicelsius: *v,
                        },
                    )
                })
                .collect(),
        }
    }

    fn labels(sample: &HwmonSample) -> Vec<(String, String, f64)> {
        sample
            .temperatures
            .iter()
            .map(|t| (t.chip.clone(), t.sensor.clone(), t.celsius))
            .collect()
    }

    #[test]
    fn input_file_names() {
        assert_eq!(temp_input_index("temp1_input"), Some(1));
        assert_eq!(temp_input_index("temp12_input"), Some(12));
        assert_eq!(temp_input_index("temp1_label"), None);
        assert_eq!(temp_input_index("in0_input"), None);
        assert_eq!(temp_input_index("temp_input"), None);
    }

    #[test]
    fn duplicate_chip_names_are_told_apart_by_device() {
        let chips = [
            chip(
                "hwmon0",
                Some("nvme"),
                Some("nvme0"),
                &[(1, Some("Composite"), 38_850)],
            ),
            chip(
                "hwmon1",
                Some("nvme"),
                Some("nvme1"),
                &[(1, Some("Composite"), 41_850)],
            ),
            chip(
                "hwmon2",
                Some("k10temp"),
                Some("0000:00:18.3"),
                &[(1, Some("Tctl"), 45_500)],
            ),
            chip("hwmon3", None, None, &[(1, None, -5_000)]),
        ];
        assert_eq!(
            labels(&HwmonSample::from_chips(&chips)),
            [
                ("nvme_nvme0".into(), "Composite".into(), 38.85),
                ("nvme_nvme1".into(), "Composite".into(), 41.85),
                ("k10temp".into(), "Tctl".into(), 45.5),
                ("hwmon3".into(), "temp1".into(), -5.0),
            ]
        );
    }

    #[test]
    fn duplicate_or_missing_sensor_labels_fall_back_to_the_index() {
        let chips = [chip(
            "hwmon0",
            Some("acpitz"),
            None,
            &[
                (1, Some("x"), 1000),
                (2, Some("x"), 2000),
                (3, None, 3000),
                (4, Some("y"), 4000),
            ],
        )];
        let sensors: Vec<String> = HwmonSample::from_chips(&chips)
            .temperatures
            .into_iter()
            .map(|t| t.sensor)
            .collect();
        assert_eq!(sensors, ["temp1", "temp2", "temp3", "y"]);
    }

    /// Fed duplicated upstream data (a label naming another sensor's index, one device that
    /// registered two chips), every series is still unique.
    #[test]
    fn series_are_unique_by_construction() {
        let chips = [
            chip(
                "hwmon0",
                Some("nvme"),
                Some("nvme0"),
                &[(1, Some("temp2"), 1000), (2, None, 2000)],
            ),
            chip(
                "hwmon1",
                Some("nvme"),
                Some("nvme0"),
                &[(1, Some("Composite"), 3000)],
            ),
            chip(
                "hwmon2",
                Some("nvme"),
                Some("nvme0"),
                &[(1, Some("Composite"), 4000)],
            ),
        ];
        let series: Vec<(String, String, f64)> = HwmonSample::from_chips(&chips)
            .temperatures
            .into_iter()
            .map(|t| (t.chip, t.sensor, t.celsius))
            .collect();
        let unique: HashSet<(&str, &str)> = series
            .iter()
            .map(|(c, s, _)| (c.as_str(), s.as_str()))
            .collect();
        assert_eq!(unique.len(), series.len(), "{series:?}");
        assert_eq!(series.len(), 4, "nothing lost: {series:?}");
        assert_eq!(series[0], ("nvme_nvme0".into(), "temp2".into(), 1.0));
        assert_eq!(series[1], ("nvme_nvme0_hwmon0".into(), "temp2".into(), 2.0));
        assert_eq!(series[3], ("nvme_nvme0".into(), "temp1".into(), 4.0));
    }
}
