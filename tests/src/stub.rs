//! A loopback HTTP server answering fixed bodies per path, changeable while it runs: a stand-in
//! for services whose answers a test needs to control (the exporter's idle API, vLLM's
//! `/health`, Ollama's `/api/tags`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;

#[derive(Debug, Default)]
struct Routes {
    answers: HashMap<String, (u16, String)>,
    hits: HashMap<String, usize>,
}

/// The stand-in; runs until the test process ends.
#[derive(Debug, Clone)]
pub struct StubServer {
    routes: Arc<Mutex<Routes>>,
    /// Base URL.
    pub url: String,
}

async fn answer(
    State(routes): State<Arc<Mutex<Routes>>>,
    request: Request,
) -> axum::response::Response {
    let path = request.uri().path().to_owned();
    let mut routes = routes.lock().unwrap();
    *routes.hits.entry(path.clone()).or_default() += 1;
    match routes.answers.get(&path) {
        Some((status, body)) => (
            StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            [(header::CONTENT_TYPE, "application/json")],
            body.clone(),
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

impl StubServer {
    /// Starts it on a loopback port; every path answers 404 until set.
    pub fn start() -> Self {
        let routes = Arc::new(Mutex::new(Routes::default()));
        let url = crate::serve(Router::new().fallback(answer).with_state(routes.clone()));
        Self { routes, url }
    }

    /// One on each loopback address in `hosts` (`127.0.0.1`, `127.0.0.2`, ...: all of
    /// 127.0.0.0/8 is loopback on Linux), all on one port: stand-ins for one service on several
    /// nodes, reached through one URL pattern (`http://{node}:PORT`). Returns them and the port.
    pub fn start_on_nodes(hosts: &[&str]) -> (Vec<Self>, u16) {
        'port: for _ in 0..50 {
            let first = std::net::TcpListener::bind((hosts[0], 0)).unwrap();
            let port = first.local_addr().unwrap().port();
            let mut listeners = vec![first];
            for host in &hosts[1..] {
                match std::net::TcpListener::bind((*host, port)) {
                    Ok(listener) => listeners.push(listener),
                    Err(_) => continue 'port,
                }
            }
            let stubs = listeners
                .into_iter()
                .map(|listener| {
                    let routes = Arc::new(Mutex::new(Routes::default()));
                    let app = Router::new().fallback(answer).with_state(routes.clone());
                    let url = crate::serve_on(listener, app);
                    Self { routes, url }
                })
                .collect();
            return (stubs, port);
        }
        panic!("no port free on every one of {hosts:?}");
    }

    /// Answers `path` with `status` and `body` from now on.
    pub fn set(&self, path: &str, status: u16, body: &str) {
        self.routes
            .lock()
            .unwrap()
            .answers
            .insert(path.to_owned(), (status, body.to_owned()));
    }

    /// How often `path` was asked.
    pub fn hits(&self, path: &str) -> usize {
        self.routes
            .lock()
            .unwrap()
            .hits
            .get(path)
            .copied()
            .unwrap_or(0)
    }
}

/// What the exporter's `GET /api/v1/gpu` answers for one GPU, with or without a game on it
/// (the shape of `aistack_common::api::GpuReport`).
pub fn gpu_report(game: bool) -> String {
    let processes = if game { r#"["steam"]"# } else { "[]" };
    format!(
        r#"{{"nvml_up":true,"sample_age_s":0.4,"gpus":[{{"gpu":0,"uuid":"GPU-1","name":"NVIDIA GeForce RTX 4090","host_workload_active":{game},"host_workload_processes":{processes}}}]}}"#
    )
}
