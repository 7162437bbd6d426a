//! HTTP pieces both binaries serve the same way: `/metrics` from a prometheus-client registry,
//! in the format and encoding the scraper asks for.
//!
//! prometheus-client writes only OpenMetrics 1.0. Prometheus asks for that, but curl, older
//! agents and tools that speak only the classic text format 0.0.4 do not: they get the classic
//! format, converted from the OpenMetrics text line by line (see [`to_classic`]), as
//! client_golang's `promhttp` negotiates. Either is gzipped when `Accept-Encoding` allows it.

use std::io::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::registry::Registry;

/// The content type of the OpenMetrics text format.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The content type of the classic Prometheus text format.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The exposition formats `/metrics` speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text, what Prometheus asks for.
    OpenMetrics,
    /// The classic text format 0.0.4, for everyone else.
    Text,
}

impl Format {
    /// The format an `Accept` header asks for: OpenMetrics only when it names
    /// `application/openmetrics-text` at least as keenly (q) as anything the classic format
    /// satisfies (`text/plain`, `text/*`, `*/*`); the classic format otherwise, and when there
    /// is no header.
    pub fn negotiate(accept: Option<&str>) -> Self {
        let (mut openmetrics, mut text) = (0.0_f32, 0.0_f32);
        for (media, q) in media_ranges(accept.unwrap_or("")) {
            if media.eq_ignore_ascii_case("application/openmetrics-text") {
                openmetrics = openmetrics.max(q);
            } else if ["text/plain", "text/*", "*/*"]
                .iter()
                .any(|m| media.eq_ignore_ascii_case(m))
            {
                text = text.max(q);
            }
        }
        if openmetrics > 0.0 && openmetrics >= text {
            Self::OpenMetrics
        } else {
            Self::Text
        }
    }

    /// Its `Content-Type`.
    pub const fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
            Self::Text => TEXT_CONTENT_TYPE,
        }
    }
}

/// Whether an `Accept-Encoding` header allows gzip (named, or as `x-gzip`, with a q above 0).
pub fn accepts_gzip(accept_encoding: Option<&str>) -> bool {
    media_ranges(accept_encoding.unwrap_or("")).any(|(coding, q)| {
        q > 0.0 && (coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip"))
    })
}

/// The items of a comma-separated header with their quality (1 when not given; 0 when
/// unreadable, so a garbled item never wins).
fn media_ranges(header: &str) -> impl Iterator<Item = (&str, f32)> {
    header.split(',').filter_map(|item| {
        let mut params = item.split(';');
        let media = params.next()?.trim();
        if media.is_empty() {
            return None;
        }
        let q = params
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
            .map_or(1.0, |(_, v)| {
                v.trim()
                    .parse::<f32>()
                    .ok()
                    .filter(|q| (0.0..=1.0).contains(q))
                    .unwrap_or(0.0)
            });
        Some((media, q))
    })
}

/// Rewrites OpenMetrics text, as prometheus-client writes it, in the classic text format 0.0.4:
/// no `# EOF` and no `# UNIT`; a counter's `# HELP` and `# TYPE` name its samples' `_total`
/// name; `unknown` is `untyped`, `info` and `stateset` are gauges (an info family's samples
/// end in `_info`); `_created` samples and exemplars are dropped.
pub fn to_classic(openmetrics: &str, out: &mut String) {
    let mut help: Option<(&str, &str)> = None;
    // The counter family whose `<name>_created` samples are dropped.
    let mut counter: Option<&str> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text));
            counter = None;
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (suffix, kind) = match kind {
                "counter" => ("_total", "counter"),
                "info" => ("_info", "gauge"),
                "gauge" | "histogram" | "summary" => ("", kind),
                "stateset" => ("", "gauge"),
                "gaugehistogram" => ("", "histogram"),
                _ => ("", "untyped"),
            };
            if matches!(kind, "counter") {
                counter = Some(name);
            }
            if let Some((_, text)) = help.take().filter(|(n, _)| *n == name) {
                push_line(out, &["# HELP ", name, suffix, " ", text]);
            }
            push_line(out, &["# TYPE ", name, suffix, " ", kind]);
        } else if line.starts_with("# ") {
            // `# UNIT`, `# EOF`: OpenMetrics only.
        } else if !line.is_empty() {
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            if counter.is_some_and(|c| line[..name_end].strip_suffix("_created") == Some(c)) {
                continue;
            }
            // An exemplar follows ` # ` after the value, outside any label value.
            let sample = match exemplar_start(line, name_end) {
                Some(at) => &line[..at],
                None => line,
            };
            push_line(out, &[sample]);
        }
    }
}

fn push_line(out: &mut String, parts: &[&str]) {
    for part in parts {
        out.push_str(part);
    }
    out.push('\n');
}

/// Where ` # ` starts an exemplar in a sample line, skipping the quoted label values.
fn exemplar_start(line: &str, name_end: usize) -> Option<usize> {
    let bytes = line.as_bytes();
    let mut at = name_end;
    if bytes.get(at) == Some(&b'{') {
        let (mut quoted, mut escaped) = (false, false);
        while at < bytes.len() {
            match bytes[at] {
                _ if escaped => escaped = false,
                b'\\' if quoted => escaped = true,
                b'"' => quoted = !quoted,
                b'}' if !quoted => break,
                _ => {}
            }
            at += 1;
        }
    }
    line[at..].find(" # ").map(|i| at + i)
}

/// Encodes `registry` in the format `request` asks for, gzipped when it allows. `last_len`
/// remembers the size of the previous answer, so the next one is allocated in one go.
pub fn metrics_response(
    registry: &Registry,
    request: &HeaderMap,
    last_len: &AtomicUsize,
) -> Response {
    // A header sent as several lines is one comma-separated list (RFC 9110, 5.3).
    let header = |name| {
        let lines: Vec<&str> = request
            .get_all(name)
            .iter()
            .filter_map(|v: &HeaderValue| v.to_str().ok())
            .collect();
        (!lines.is_empty()).then(|| lines.join(","))
    };
    let format = Format::negotiate(header(header::ACCEPT).as_deref());
    let capacity = last_len.load(Ordering::Relaxed) + 512;
    let mut openmetrics = String::with_capacity(capacity);
    if let Err(err) = prometheus_client::encoding::text::encode(&mut openmetrics, registry) {
        tracing::error!(%err, "encoding metrics failed");
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding metrics failed\n",
        )
            .into_response();
    }
    last_len.store(openmetrics.len(), Ordering::Relaxed);
    let body = match format {
        Format::OpenMetrics => openmetrics,
        Format::Text => {
            let mut text = String::with_capacity(capacity);
            to_classic(&openmetrics, &mut text);
            text
        }
    };
    let vary = (header::VARY, "Accept, Accept-Encoding");
    let content_type = (header::CONTENT_TYPE, format.content_type());
    if !accepts_gzip(header(header::ACCEPT_ENCODING).as_deref()) {
        return ([content_type, vary], body).into_response();
    }
    let mut gzip = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::fast(),
    );
    // Writing into a Vec cannot fail.
    let gzipped = gzip.write_all(body.as_bytes()).and_then(|()| gzip.finish());
    match gzipped {
        Ok(bytes) => (
            [content_type, vary, (header::CONTENT_ENCODING, "gzip")],
            bytes,
        )
            .into_response(),
        Err(_) => ([content_type, vary], body).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_gets_openmetrics_and_everyone_else_the_classic_format() {
        use Format::{OpenMetrics, Text};
        let cases = [
            // Prometheus 2.x's default scrape_protocols.
            (
                Some(
                    "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
                ),
                OpenMetrics,
            ),
            // Prometheus 3.x with protobuf first: no protobuf here, OpenMetrics is next.
            (
                Some(
                    "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0.6,application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3",
                ),
                OpenMetrics,
            ),
            (Some("application/openmetrics-text"), OpenMetrics),
            (
                Some("Application/OpenMetrics-Text; version=1.0.0"),
                OpenMetrics,
            ),
            (Some("text/plain;version=0.0.4"), Text),
            (
                Some("text/plain;version=0.0.4;q=0.9,application/openmetrics-text;q=0.5"),
                Text,
            ),
            (Some("*/*"), Text), // curl
            (None, Text),
            (Some(""), Text),
            (Some("application/openmetrics-text;q=0"), Text),
            (Some("application/openmetrics-text;q=banana"), Text),
            (Some("application/json"), Text),
        ];
        for (accept, want) in cases {
            assert_eq!(Format::negotiate(accept), want, "{accept:?}");
        }
    }

    #[test]
    fn gzip_only_when_allowed() {
        assert!(accepts_gzip(Some("gzip")));
        assert!(accepts_gzip(Some("deflate, GZIP;q=0.5")));
        assert!(accepts_gzip(Some("x-gzip")));
        assert!(!accepts_gzip(Some("gzip;q=0")));
        assert!(!accepts_gzip(Some("identity")));
        assert!(!accepts_gzip(Some("br, zstd")));
        assert!(!accepts_gzip(None));
    }

    #[test]
    fn openmetrics_becomes_the_classic_format() {
        let openmetrics = "\
# HELP aistack_up Whether it is up.
# TYPE aistack_up gauge
aistack_up 1
# HELP aistack_energy_joules Energy used.
# TYPE aistack_energy_joules counter
# UNIT aistack_energy_joules joules
aistack_energy_joules_total{package=\"0\"} 12.5
aistack_energy_joules_created{package=\"0\"} 1700000000.0
# HELP aistack_requests Requests.
# TYPE aistack_requests counter
aistack_requests_total{path=\"a # b\"} 3 # {trace_id=\"x\"} 1.0
# HELP aistack_build Build.
# TYPE aistack_build info
aistack_build_info{version=\"1\"} 1
# HELP aistack_mystery Who knows.
# TYPE aistack_mystery unknown
aistack_mystery 2
# HELP aistack_latency_seconds Latency.
# TYPE aistack_latency_seconds histogram
# UNIT aistack_latency_seconds seconds
aistack_latency_seconds_sum 1.5
aistack_latency_seconds_count 2
aistack_latency_seconds_bucket{le=\"+Inf\"} 2
# EOF
";
        let mut text = String::new();
        to_classic(openmetrics, &mut text);
        assert_eq!(
            text,
            "\
# HELP aistack_up Whether it is up.
# TYPE aistack_up gauge
aistack_up 1
# HELP aistack_energy_joules_total Energy used.
# TYPE aistack_energy_joules_total counter
aistack_energy_joules_total{package=\"0\"} 12.5
# HELP aistack_requests_total Requests.
# TYPE aistack_requests_total counter
aistack_requests_total{path=\"a # b\"} 3
# HELP aistack_build_info Build.
# TYPE aistack_build_info gauge
aistack_build_info{version=\"1\"} 1
# HELP aistack_mystery Who knows.
# TYPE aistack_mystery untyped
aistack_mystery 2
# HELP aistack_latency_seconds Latency.
# TYPE aistack_latency_seconds histogram
aistack_latency_seconds_sum 1.5
aistack_latency_seconds_count 2
aistack_latency_seconds_bucket{le=\"+Inf\"} 2
"
        );
    }
}
