//! HTTP pieces both binaries serve the same way: `/metrics` from a prometheus-client registry.

use std::sync::atomic::{AtomicUsize, Ordering};

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::registry::Registry;

/// The content type of the OpenMetrics text format.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Encodes `registry` as OpenMetrics text. `last_len` remembers the size of the previous answer,
/// so the next one is allocated in one go.
pub fn metrics_response(registry: &Registry, last_len: &AtomicUsize) -> Response {
    let mut body = String::with_capacity(last_len.load(Ordering::Relaxed) + 512);
    if let Err(err) = prometheus_client::encoding::text::encode(&mut body, registry) {
        tracing::error!(%err, "encoding metrics failed");
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding metrics failed\n",
        )
            .into_response();
    }
    last_len.store(body.len(), Ordering::Relaxed);
    ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], body).into_response()
}
