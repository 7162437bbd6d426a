//! A stand-in ntfy server on loopback: records what is published (ntfy's JSON publishing at
//! the root URL) and can be told to fail, stall or rate-limit, as a real server or its
//! network sometimes does.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;

/// How the next publishes are answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 200 with ntfy's message JSON.
    Ok,
    /// 500, the next `n` times, then Ok.
    Fail(u32),
    /// 429 Too Many Requests, the next `n` times, then Ok.
    RateLimit(u32),
    /// Never answers (until the client gives up).
    Stall,
}

#[derive(Debug)]
struct Inner {
    mode: Mode,
    published: Vec<serde_json::Value>,
    attempts: usize,
    authorization: Vec<String>,
    direct: Vec<(String, serde_json::Value)>,
}

/// The stand-in; stops with the test process.
#[derive(Debug, Clone)]
pub struct FakeNtfy {
    inner: Arc<Mutex<Inner>>,
    /// Its base URL.
    pub url: String,
}

async fn publish(
    State(inner): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let mode = {
        let mut i = inner.lock().unwrap();
        i.attempts += 1;
        if let Some(auth) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
            i.authorization.push(auth.to_owned());
        }
        let mode = i.mode;
        i.mode = match mode {
            Mode::Fail(n) if n > 1 => Mode::Fail(n - 1),
            Mode::RateLimit(n) if n > 1 => Mode::RateLimit(n - 1),
            Mode::Fail(_) | Mode::RateLimit(_) => Mode::Ok,
            other => other,
        };
        mode
    };
    match mode {
        Mode::Stall => {
            tokio::time::sleep(Duration::from_secs(600)).await;
            (StatusCode::OK, String::new())
        }
        Mode::Fail(_) => (StatusCode::INTERNAL_SERVER_ERROR, r#"{"code":50001,"http":500,"error":"internal server error"}"#.into()),
        Mode::RateLimit(_) => (
            StatusCode::TOO_MANY_REQUESTS,
            r#"{"code":42901,"http":429,"error":"limit reached: too many requests","link":"https://ntfy.sh/docs/publish/#limitations"}"#.into(),
        ),
        Mode::Ok => {
            let Ok(message) = serde_json::from_slice::<serde_json::Value>(&body) else {
                return (StatusCode::BAD_REQUEST, r#"{"code":40024,"http":400,"error":"invalid request: request body must be JSON"}"#.into());
            };
            let reply = serde_json::json!({
                "id": format!("m{}", inner.lock().unwrap().published.len() + 1),
                "time": 1_795_385_000,
                "event": "message",
                "topic": message["topic"],
                "title": message["title"],
                "message": message["message"],
            });
            inner.lock().unwrap().published.push(message);
            (StatusCode::OK, reply.to_string())
        }
    }
}

/// `POST /{topic}`: what Alertmanager's webhook posts straight to a topic (the `ntfy-direct`
/// receiver); kept as sent, with the topic.
async fn publish_to_topic(
    State(inner): State<Arc<Mutex<Inner>>>,
    axum::extract::Path(topic): axum::extract::Path<String>,
    body: Bytes,
) -> (StatusCode, String) {
    let body = serde_json::from_slice(&body)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&body).into_owned()));
    inner.lock().unwrap().direct.push((topic, body));
    (StatusCode::OK, "{}".into())
}

impl FakeNtfy {
    /// Starts it on a loopback port, in a thread of its own.
    pub fn start() -> Self {
        let inner = Arc::new(Mutex::new(Inner {
            mode: Mode::Ok,
            published: Vec::new(),
            attempts: 0,
            authorization: Vec::new(),
            direct: Vec::new(),
        }));
        let url = crate::serve(
            Router::new()
                .route("/", post(publish))
                .route("/{topic}", post(publish_to_topic))
                .with_state(inner.clone()),
        );
        Self { inner, url }
    }

    /// How the next publishes are answered.
    pub fn set_mode(&self, mode: Mode) {
        self.inner.lock().unwrap().mode = mode;
    }

    /// Messages published so far.
    pub fn published(&self) -> Vec<serde_json::Value> {
        self.inner.lock().unwrap().published.clone()
    }

    /// Publish attempts so far, failed ones included.
    pub fn attempts(&self) -> usize {
        self.inner.lock().unwrap().attempts
    }

    /// What was posted straight to a topic (`POST /{topic}`), with the topic: Alertmanager's
    /// `ntfy-direct` receiver.
    pub fn direct(&self) -> Vec<(String, serde_json::Value)> {
        self.inner.lock().unwrap().direct.clone()
    }

    /// The Authorization headers seen.
    pub fn authorization(&self) -> Vec<String> {
        self.inner.lock().unwrap().authorization.clone()
    }
}
