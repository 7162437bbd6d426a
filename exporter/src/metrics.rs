//! Encoding: the registry adapter that turns the collectors' latest snapshots into OpenMetrics
//! text on each scrape, and small helpers to write whole gauge and counter families.
//!
//! Nothing here does I/O or waits: a scrape clones `Arc`s out of `watch` channels (a short read
//! lock each), drops the locks, and formats.

use std::fmt;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::collectors::{CollectorKind, EncodeSample, Latest, Status};

/// The metric name prefix of every exporter family.
pub const PREFIX: &str = "aistack";

/// Writes a gauge family with one series per item; writes nothing when `series` is empty, so
/// absent hardware leaves no empty family behind.
pub fn gauge_family<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&str>,
    series: impl IntoIterator<Item = (L, f64)>,
) -> fmt::Result {
    family(encoder, name, help, unit, MetricType::Gauge, series)
}

/// Writes a counter family (`_total` is added) with one series per item; nothing when empty.
pub fn counter_family<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&str>,
    series: impl IntoIterator<Item = (L, f64)>,
) -> fmt::Result {
    family(encoder, name, help, unit, MetricType::Counter, series)
}

/// Writes an unlabelled gauge.
pub fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&str>,
    value: f64,
) -> fmt::Result {
    let unit = unit.map(|u| Unit::Other(u.to_owned()));
    let mut metric = encoder.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?;
    metric.encode_gauge(&value)
}

/// Writes an unlabelled counter.
pub fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&str>,
    value: f64,
) -> fmt::Result {
    let unit = unit.map(|u| Unit::Other(u.to_owned()));
    let mut metric = encoder.encode_descriptor(name, help, unit.as_ref(), MetricType::Counter)?;
    metric.encode_counter::<NoLabelSet, _, f64>(&value, None)
}

fn family<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&str>,
    metric_type: MetricType,
    series: impl IntoIterator<Item = (L, f64)>,
) -> fmt::Result {
    let mut series = series.into_iter().peekable();
    if series.peek().is_none() {
        return Ok(());
    }
    let unit = unit.map(|u| Unit::Other(u.to_owned()));
    let mut metric = encoder.encode_descriptor(name, help, unit.as_ref(), metric_type)?;
    for (labels, value) in series {
        let mut labelled = metric.encode_family(&labels)?;
        match metric_type {
            MetricType::Counter => labelled.encode_counter::<NoLabelSet, _, f64>(&value, None)?,
            _ => labelled.encode_gauge(&value)?,
        }
    }
    Ok(())
}

/// A collector's channel as the scrape path sees it.
pub trait CollectorView: fmt::Debug + Send + Sync {
    /// Which collector.
    fn kind(&self) -> CollectorKind;
    /// How its last sample went; `None` before the first.
    fn status(&self) -> Option<Status>;
    /// Encodes its latest sample, if any.
    fn encode_sample(&self, encoder: &mut DescriptorEncoder) -> fmt::Result;
}

/// What a collector shows while it has no sample, after [`EncodeSample::encode_missing`]:
/// state it keeps between samples (the GPUs it has seen, say).
pub trait EncodeWhileMissing: fmt::Debug + Send + Sync + 'static {
    /// Encodes that state; each family complete.
    fn encode(&self, encoder: &mut DescriptorEncoder) -> fmt::Result;
}

#[derive(Debug)]
struct View<S> {
    kind: CollectorKind,
    latest: Latest<S>,
    missing: Option<Arc<dyn EncodeWhileMissing>>,
}

impl<S: EncodeSample> CollectorView for View<S> {
    fn kind(&self) -> CollectorKind {
        self.kind
    }

    fn status(&self) -> Option<Status> {
        self.latest.borrow().status
    }

    fn encode_sample(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        // Clone the Arc and release the channel's lock before formatting.
        let (sample, ran) = {
            let snapshot = self.latest.borrow();
            (snapshot.sample.clone(), snapshot.status.is_some())
        };
        match sample {
            Some(sample) => sample.encode(encoder),
            None if ran => {
                S::encode_missing(encoder)?;
                match &self.missing {
                    Some(missing) => missing.encode(encoder),
                    None => Ok(()),
                }
            }
            None => Ok(()),
        }
    }
}

/// Wraps a collector's receiver for [`ExporterMetrics`].
pub fn view<S: EncodeSample>(kind: CollectorKind, latest: Latest<S>) -> Box<dyn CollectorView> {
    Box::new(View {
        kind,
        latest,
        missing: None,
    })
}

/// [`view`], showing `missing` too while the collector has no sample.
pub fn view_with_missing<S: EncodeSample>(
    kind: CollectorKind,
    latest: Latest<S>,
    missing: Arc<dyn EncodeWhileMissing>,
) -> Box<dyn CollectorView> {
    Box::new(View {
        kind,
        latest,
        missing: Some(missing),
    })
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    revision: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CollectorLabels {
    collector: CollectorKind,
}

/// Everything the exporter serves, encoded from snapshots on each scrape.
#[derive(Debug)]
pub struct ExporterMetrics {
    collectors: Vec<Box<dyn CollectorView>>,
}

impl ExporterMetrics {
    /// Encodes the given collectors' snapshots plus the exporter's own families.
    pub fn new(collectors: Vec<Box<dyn CollectorView>>) -> Self {
        Self { collectors }
    }

    /// A registry with the `aistack` prefix holding these metrics.
    pub fn into_registry(self) -> Arc<Registry> {
        let mut registry = Registry::with_prefix(PREFIX);
        registry.register_collector(Box::new(self));
        Arc::new(registry)
    }
}

impl prometheus_client::collector::Collector for ExporterMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let build = BuildLabels {
            version: aistack_common::VERSION,
            revision: aistack_common::REVISION,
        };
        gauge_family(
            &mut encoder,
            "exporter_build_info",
            "Version and git revision of aistack-exporter; always 1.",
            None,
            [(build, 1.0)],
        )?;

        let statuses: Vec<(CollectorKind, Status)> = self
            .collectors
            .iter()
            .filter_map(|c| c.status().map(|s| (c.kind(), s)))
            .collect();
        let labels = |kind| CollectorLabels { collector: kind };
        gauge_family(
            &mut encoder,
            "collector_success",
            "Whether the collector's last sample succeeded (1) or failed or found no data (0).",
            None,
            statuses
                .iter()
                .map(|(k, s)| (labels(*k), if s.success { 1.0 } else { 0.0 })),
        )?;
        gauge_family(
            &mut encoder,
            "collector_duration",
            "How long the collector's last sample took.",
            Some("seconds"),
            statuses
                .iter()
                .map(|(k, s)| (labels(*k), s.duration.as_secs_f64())),
        )?;
        gauge_family(
            &mut encoder,
            "collector_last_success_timestamp",
            "Unix time of the collector's last successful sample.",
            Some("seconds"),
            statuses.iter().filter_map(|(k, s)| {
                let at = s.last_success?.duration_since(UNIX_EPOCH).ok()?;
                Some((labels(*k), at.as_secs_f64()))
            }),
        )?;

        for collector in &self.collectors {
            collector.encode_sample(&mut encoder)?;
        }
        Ok(())
    }
}
