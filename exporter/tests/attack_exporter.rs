//! Attacks on the exporter's probes, series and `/metrics` negotiation (issue 15's change).
//! Each test's comment tells what the attack did before the code was mended; its name, what
//! must hold now. `holds_` tests are claims that were attacked and held.
//!
//! Run one: `cargo test -p aistack-exporter --test attack_exporter NAME -- --nocapture`.
//! The services test against the binary needs `cargo build -p aistack-exporter` first.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use aistack_common::http::{Format, accepts_gzip, metrics_response, to_classic};
use aistack_exporter::collectors::Collector;
use aistack_exporter::collectors::hwmon::{ChipReading, HwmonSample, TempReading};
use aistack_exporter::collectors::services::ServicesCollector;
use aistack_exporter::config::{ServiceConfig, ServiceKind, ServiceScope};
use aistack_tests::{Daemon, check_text_format, get_with, serve};
use axum::Router;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::routing::get;

fn service(name: &str, kind: ServiceKind, url: String) -> ServiceConfig {
    ServiceConfig {
        name: name.into(),
        kind,
        url,
        container: None,
        process: None,
        pods: None,
        scope: ServiceScope::Host,
        node: None,
    }
}

/// A vLLM stand-in: `/health` after `health_delay`, `/v1/models` at once.
fn vllm(health_delay: Duration) -> String {
    serve(
        Router::new()
            .route(
                "/health",
                get(move || async move {
                    tokio::time::sleep(health_delay).await;
                    ""
                }),
            )
            .route(
                "/v1/models",
                get(|| async { r#"{"object":"list","data":[{"id":"m1"}]}"# }),
            ),
    )
}

/// A server that accepts connections and never answers.
fn hung() -> String {
    serve(Router::new().fallback(|| async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        ""
    }))
}

// ---------------------------------------------------------------------------------------------
// services

/// HIGH. `collectors.services.timeout` may equal the interval (config validation allows
/// `timeout <= interval`; the default is `min(2s, interval)`, so `interval: 1s` alone gets it).
/// The runner's timeout for the whole services sample is the interval (lib.rs `whole`), but a
/// hung health request takes the full probe timeout, started a moment after the sample: the
/// runner fires first, the whole sample is published as failed, and every service's series
/// vanish, the healthy ones included. docs/services.md: "a slow or hung service delays
/// neither a scrape nor another probe".
#[test]
fn a_hung_service_never_costs_the_others_their_series_even_when_timeout_is_the_interval() {
    let good = vllm(Duration::ZERO);
    let hung = hung();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("exporter.yaml");
    std::fs::write(
        &config,
        format!(
            "collectors:\n  docker: {{enabled: false}}\n  gpu: {{enabled: false}}\n  logind: {{enabled: false}}\n  services: {{interval: 2s, timeout: 2s}}\nservices:\n  - {{name: good, kind: vllm, url: '{good}'}}\n  - {{name: hung, kind: vllm, url: '{hung}'}}\n"
        ),
    )
    .unwrap();
    let exporter = Daemon::start(
        "aistack-exporter",
        &["--config.file", config.to_str().unwrap()],
    );
    std::thread::sleep(Duration::from_secs(5));
    let (mut with, mut without) = (0, 0);
    for _ in 0..12 {
        let body = get_with(&exporter.url("/metrics"), &[]).body;
        if body.contains(r#"aistack_service_up{service="good",kind="vllm"} 1"#)
            && body.contains(r#"aistack_service_up{service="hung",kind="vllm"} 0"#)
        {
            with += 1;
        } else {
            without += 1;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let failed = exporter
        .log()
        .iter()
        .filter(|l| l.contains("collector failed") && l.contains("services"))
        .count();
    assert_eq!(
        without,
        0,
        "the healthy service's series was missing in {without} of {} scrapes; \
         'collector failed' (services) logged {failed} times",
        with + without
    );
}

/// MEDIUM (regression against 0.1.0, which did `get(client, url)`). docs/services.md and
/// `ServiceConfig::base_url`: "An `http` service's URL is used as given". `check_health`
/// joins it with "" through `join`, which trims trailing slashes, so
/// `http://host/status/` is probed as `http://host/status` (a 404 or a redirect on servers
/// that tell them apart: FastAPI, Django, axum).
#[tokio::test]
async fn an_http_services_url_is_probed_exactly_as_given() {
    let base = serve(Router::new().route("/status/", get(|| async { "ok" })));
    let url = format!("{base}/status/");
    let broken = format!("{base}/exact/status/");
    let mut collector = ServicesCollector::new(
        vec![
            service("web", ServiceKind::Http, url.clone()),
            service("broken", ServiceKind::Http, broken),
        ],
        Duration::from_secs(1),
        Duration::from_secs(5),
    )
    .unwrap();
    let sample = collector.sample(Instant::now()).await.unwrap();
    let web = &sample.services[0];
    assert!(web.up, "GET {url} answers 200, yet: {web:?}");
    // A failure is counted under the URL's own path (was "/").
    let keys: Vec<&(String, String)> = sample.probe_errors.keys().collect();
    assert_eq!(keys, [&("broken".to_owned(), "/exact/status/".to_owned())]);
}

/// LOW-MEDIUM. The extras' time is `min(timeout, 0.9 * interval - health time)`; below 50 ms
/// they are not asked at all, and that is neither an error nor a log line. A service whose
/// health request habitually takes most of the interval (a loaded vLLM's /health, with
/// `timeout` close to `interval`) never reports its models, and
/// `aistack_service_probe_errors_total{endpoint="/v1/models"}` stays absent: the detail is
/// silently missing for good.
#[tokio::test]
async fn extras_the_interval_left_no_time_for_are_counted() {
    let base = vllm(Duration::from_millis(1780));
    let mut collector = ServicesCollector::new(
        vec![service("vllm", ServiceKind::Vllm, base)],
        Duration::from_millis(1900),
        Duration::from_secs(2),
    )
    .unwrap();
    let t0 = Instant::now();
    let mut last = None;
    for i in 0..2 {
        last = Some(
            collector
                .sample(t0 + Duration::from_secs(2 * i))
                .await
                .unwrap(),
        );
    }
    let sample = last.unwrap();
    let vllm = &sample.services[0];
    assert!(vllm.up, "{vllm:?}");
    let counted = sample
        .probe_errors
        .get(&("vllm".to_owned(), "/v1/models".to_owned()))
        .copied()
        .unwrap_or(0);
    assert!(
        vllm.models.is_empty(),
        "no time was left to ask: {sample:?}"
    );
    assert_eq!(counted, 2, "{sample:?}");
    assert!(
        vllm.extra_errors[0].1.contains("no time"),
        "{:?}",
        vllm.extra_errors
    );
}

/// LOW (cardinality). GPU processes are now bounded (8 + services + "other"), but one
/// Ollama's `/api/tags` under the 4 MiB body limit can hold ~200 000 short model names, each
/// its own `aistack_ollama_model_size_bytes` series (a 13 MB scrape). No bound, no summing.
#[tokio::test]
async fn model_series_per_service_are_bounded() {
    let n = 200_000;
    let tags: String = format!(
        "{{\"models\":[{}]}}",
        (0..n)
            .map(|i| format!("{{\"name\":\"m{i}\"}}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    assert!(tags.len() < 4 << 20);
    let base = serve(
        Router::new()
            .route("/api/version", get(|| async { r#"{"version":"0.12.0"}"# }))
            .route("/api/tags", get(move || async move { tags.clone() }))
            .route("/api/ps", get(|| async { r#"{"models":[]}"# })),
    );
    let mut collector = ServicesCollector::new(
        vec![service("ollama", ServiceKind::Ollama, base)],
        Duration::from_secs(2),
        Duration::from_secs(5),
    )
    .unwrap();
    let sample = collector.sample(Instant::now()).await.unwrap();
    let series = sample.services[0].model_sizes.len();
    assert_eq!(
        series,
        aistack_exporter::collectors::services::MAX_MODELS,
        "model_size series from one service"
    );
    assert!(sample.services[0].up);
}

/// NIT. For vllm/localai/ollama the URL's trailing "/v1" is stripped by plain string suffix,
/// so a host named `v1` without a port (`http://v1`, a compose service name) becomes `http:/`.
#[test]
fn a_host_named_v1_is_no_openai_base() {
    let s = service("v", ServiceKind::Vllm, "http://v1".into());
    assert_eq!(s.base_url(), "http://v1");
    let s = service("v", ServiceKind::Vllm, "http://v1:8000/v1".into());
    assert_eq!(s.base_url(), "http://v1:8000");
    let s = service("v", ServiceKind::Localai, "http://h/api/v1".into());
    assert_eq!(s.base_url(), "http://h/api");
}

// ---------------------------------------------------------------------------------------------
// hwmon

fn chip(dir: &str, temps: &[(u32, Option<&str>, i64)]) -> ChipReading {
    ChipReading {
        dir: dir.into(),
        name: Some("nvme".into()),
        device: Some("nvme0".into()),
        temps: temps
            .iter()
            .map(|&(i, label, millicelsius)| {
                (
                    i,
                    TempReading {
                        label: label.map(Into::into),
                        millicelsius: Some(millicelsius),
                    },
                )
            })
            .collect(),
    }
}

/// LOW. "Unique by construction" is unique within one sample only: which labels a colliding
/// sensor gets depends on which other sensors were readable this time (unreadable sensors are
/// left out, "ENODATA and EIO are common while a device sleeps"). Two chips registered by one
/// device (the case the commit handles): when hwmon0's sensor cannot be read for one sample,
/// hwmon1's sensor takes over hwmon0's series, so one series jumps between two sensors.
#[test]
fn a_hwmon_series_names_one_sensor_whichever_were_readable() {
    let labels_of = |chips: &[ChipReading]| -> BTreeMap<i64, (String, String)> {
        HwmonSample::from_chips(chips)
            .temperatures
            .into_iter()
            .map(|t| ((t.celsius * 1000.0) as i64, (t.chip, t.sensor)))
            .collect()
    };
    // hwmon1's sensor reads 42 °C throughout.
    let both = labels_of(&[
        chip("hwmon0", &[(1, Some("Composite"), 30_000)]),
        chip("hwmon1", &[(1, Some("Composite"), 42_000)]),
    ]);
    let hwmon0_asleep = labels_of(&[
        chip("hwmon0", &[]),
        chip("hwmon1", &[(1, Some("Composite"), 42_000)]),
    ]);
    assert_eq!(
        both[&42_000], hwmon0_asleep[&42_000],
        "the same physical sensor changed series; with both readable {both:?}, \
         with hwmon0 asleep {hwmon0_asleep:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// /metrics negotiation

/// LOW. RFC 9110 §5.3: a header sent as several field lines means the same as one
/// comma-joined line. `metrics_response` reads only the first `Accept` line.
#[test]
fn an_accept_header_sent_as_two_lines_is_one_list() {
    let mut headers = HeaderMap::new();
    headers.append(header::ACCEPT, HeaderValue::from_static("text/plain;q=0.1"));
    headers.append(
        header::ACCEPT,
        HeaderValue::from_static("application/openmetrics-text"),
    );
    let joined = "text/plain;q=0.1, application/openmetrics-text";
    assert_eq!(Format::negotiate(Some(joined)), Format::OpenMetrics);
    let registry = prometheus_client::registry::Registry::default();
    let response = metrics_response(&registry, &headers, &AtomicUsize::new(0));
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        Format::OpenMetrics.content_type()
    );
}

/// NIT. RFC 9110 §8.4.1.3: "A recipient SHOULD consider x-gzip to be equivalent to gzip".
#[test]
fn x_gzip_is_gzip() {
    assert!(accepts_gzip(Some("x-gzip")));
}

/// Held: a prometheus-client registry with every shape the binaries use and more (histogram
/// with exemplars, counter with exemplar, info, unit, label values with `"`, `\`, newline,
/// ` # ` and `}`), converted, is accepted by promtool.
#[test]
fn holds_to_classic_of_histograms_exemplars_and_escapes_passes_promtool() {
    use prometheus_client::encoding::EncodeLabelSet;
    use prometheus_client::metrics::exemplar::{CounterWithExemplar, HistogramWithExemplars};
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::info::Info;
    use prometheus_client::registry::{Registry, Unit};

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct L {
        v: String,
    }
    let mut registry = Registry::with_prefix("aistack");
    let weird = "a\"b\\c\nd} # e { f=\"g\"".to_owned();
    let hist = HistogramWithExemplars::<L>::new([0.1, 1.0, 10.0].into_iter());
    hist.observe(0.5, Some(L { v: weird.clone() }), None);
    registry.register_with_unit("latency", "Latency.", Unit::Seconds, hist);
    let counter = CounterWithExemplar::<L>::default();
    counter.inc_by(3, Some(L { v: weird.clone() }), None);
    registry.register("requests", "Requests.", counter);
    registry.register("build", "Build.", Info::new(L { v: weird.clone() }));
    let family = Family::<L, prometheus_client::metrics::counter::Counter>::default();
    family.get_or_create(&L { v: weird }).inc();
    registry.register("by_label", "By label.", family);
    let mut openmetrics = String::new();
    prometheus_client::encoding::text::encode(&mut openmetrics, &registry).unwrap();
    let mut text = String::new();
    to_classic(&openmetrics, &mut text);
    check_text_format(&text).unwrap_or_else(|e| panic!("{e}\n{openmetrics}\n---\n{text}"));
    assert!(!text.contains("trace") && !text.contains("# EOF"), "{text}");
}
