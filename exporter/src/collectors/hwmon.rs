//! `hwmon`: temperatures from the hardware monitor chips under `<sysfs>/class/hwmon`.
//!
//! `chip` is the chip's `name` (coretemp, k10temp, nvme, amdgpu, ...). When two chips share a
//! name (two NVMe drives), each gets its device's name appended (`nvme_nvme0`), else its hwmon
//! directory; chips that still share a label (one device registered twice) get their directory
//! too. `sensor` is `tempN_label` when the chip labels it uniquely (and the label is no other
//! sensor's `tempM`), else `tempN`. Names depend only on the files present, never on which
//! sensors were readable, so a series keeps naming the same sensor from sample to sample. A
//! sensor that fails to read (ENODATA and EIO are common while a device sleeps) is left out.

use std::collections::{BTreeMap, HashMap};
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
    /// Temperature inputs, by their index N in `tempN_input`, readable or not.
    pub temps: BTreeMap<u32, TempReading>,
}

/// One temperature input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TempReading {
    /// `tempN_label`, if present.
    pub label: Option<String>,
    /// `tempN_input` in millidegrees Celsius; `None` when it could not be read this time.
    pub millicelsius: Option<i64>,
}

/// The index N of a `tempN_input` file name.
pub fn temp_input_index(file_name: &str) -> Option<u32> {
    file_name
        .strip_prefix("temp")?
        .strip_suffix("_input")?
        .parse()
        .ok()
}

/// Whether a name is a sensor's fallback name, `tempN`.
fn is_index_name(name: &str) -> bool {
    name.strip_prefix("temp")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
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
        let millicelsius = read_trimmed(entry.path()).and_then(|v| v.parse::<i64>().ok());
        if millicelsius.is_none() {
            tracing::debug!(collector = "hwmon", path = %entry.path().display(), "unreadable sensor skipped");
        }
        // The label even when the input is unreadable: the names must not depend on it.
        let label = read_trimmed(dir.join(format!("temp{index}_label")));
        temps.insert(
            index,
            TempReading {
                label,
                millicelsius,
            },
        );
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
    /// Labels the readings: unique chip names, unique sensor names within a chip, from the
    /// files present only (so stable while sensors come and go).
    pub fn from_chips(chips: &[ChipReading]) -> Self {
        let base = |c: &ChipReading| c.name.clone().unwrap_or_else(|| c.dir.clone());
        let mut name_count: HashMap<String, usize> = HashMap::new();
        for chip in chips {
            *name_count.entry(base(chip)).or_default() += 1;
        }
        let first_labels: Vec<String> = chips
            .iter()
            .map(|chip| {
                let name = base(chip);
                if name_count[&name] > 1 {
                    format!("{name}_{}", chip.device.as_deref().unwrap_or(&chip.dir))
                } else {
                    name
                }
            })
            .collect();
        let mut label_count: HashMap<&str, usize> = HashMap::new();
        for label in &first_labels {
            *label_count.entry(label).or_default() += 1;
        }
        let mut temperatures = Vec::new();
        for (chip, first) in chips.iter().zip(&first_labels) {
            // One device that registered two chips: the directory tells them apart.
            let chip_label = if label_count[first.as_str()] > 1 {
                format!("{first}_{}", chip.dir)
            } else {
                first.clone()
            };
            let mut sensor_count: HashMap<&str, usize> = HashMap::new();
            for t in chip.temps.values() {
                if let Some(label) = &t.label {
                    *sensor_count.entry(label).or_default() += 1;
                }
            }
            for (index, t) in &chip.temps {
                let Some(millicelsius) = t.millicelsius else {
                    continue;
                };
                let by_index = format!("temp{index}");
                // A label naming another sensor's index (`temp1_label` = "temp2") would take
                // that sensor's fallback name.
                let sensor = match &t.label {
                    Some(label)
                        if sensor_count[label.as_str()] == 1
                            && (!is_index_name(label) || *label == by_index) =>
                    {
                        label.clone()
                    }
                    _ => by_index,
                };
                temperatures.push(Temperature {
                    chip: chip_label.clone(),
                    sensor,
                    celsius: millicelsius as f64 / 1000.0,
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
                            millicelsius: Some(*v),
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
        let unique: std::collections::HashSet<(&str, &str)> = series
            .iter()
            .map(|(c, s, _)| (c.as_str(), s.as_str()))
            .collect();
        assert_eq!(unique.len(), series.len(), "{series:?}");
        assert_eq!(series.len(), 4, "nothing lost: {series:?}");
        assert_eq!(
            series,
            [
                ("nvme_nvme0_hwmon0".into(), "temp1".into(), 1.0),
                ("nvme_nvme0_hwmon0".into(), "temp2".into(), 2.0),
                ("nvme_nvme0_hwmon1".into(), "Composite".into(), 3.0),
                ("nvme_nvme0_hwmon2".into(), "Composite".into(), 4.0),
            ]
        );
    }

    /// A series names the same sensor whichever sensors could be read: the names come from the
    /// files present, not from the readings (found by attack: a sleeping drive's unreadable
    /// sensor moved its twin's reading to another series).
    #[test]
    fn names_do_not_depend_on_which_sensors_were_readable() {
        let twins = |first: Option<i64>| {
            let mut chips = vec![
                chip(
                    "hwmon0",
                    Some("nvme"),
                    Some("nvme0"),
                    &[(1, Some("Composite"), 0)],
                ),
                chip(
                    "hwmon1",
                    Some("nvme"),
                    Some("nvme0"),
                    &[
                        (1, Some("Composite"), 42_000),
                        (2, Some("Composite"), 43_000),
                    ],
                ),
            ];
            chips[0].temps.get_mut(&1).unwrap().millicelsius = first;
            labels(&HwmonSample::from_chips(&chips))
                .into_iter()
                .filter(|(_, _, c)| *c > 40.0)
                .collect::<Vec<_>>()
        };
        assert_eq!(twins(Some(30_000)), twins(None));
        assert_eq!(
            twins(None),
            [
                ("nvme_nvme0_hwmon1".into(), "temp1".into(), 42.0),
                ("nvme_nvme0_hwmon1".into(), "temp2".into(), 43.0),
            ]
        );
    }
}
