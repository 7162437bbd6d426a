//! The services collector end to end: the exporter binary, with its default probe timeout and
//! interval, against loopback stand-ins that send what vLLM, Ollama and LocalAI really send
//! (tests/fixtures/services), slowly, twice, starting, behind a proxy's error page, and with
//! Ollama's cloud models.

use std::collections::HashSet;
use std::time::Duration;

use aistack_tests::{Daemon, check_text_format, fixtures, parse_openmetrics, serve, wait_for};
use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

const EXPORTER: &str = "aistack-exporter";

fn value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(fixtures().join("services").join(name)).unwrap()
}

/// `GET path` answers the fixture `name` with `status` after `delay`.
fn route(app: Router, path: &str, name: &'static str, status: u16, delay: Duration) -> Router {
    app.route(
        path,
        get(move || async move {
            tokio::time::sleep(delay).await;
            let content_type = if name.ends_with(".json") {
                "application/json; charset=utf-8"
            } else if name.ends_with(".html") {
                "text/html"
            } else {
                "text/plain; charset=utf-8"
            };
            (
                StatusCode::from_u16(status).unwrap(),
                [(header::CONTENT_TYPE, content_type)],
                fixture(name),
            )
                .into_response()
        }),
    )
}

const FAST: Duration = Duration::ZERO;
const SLOW: Duration = Duration::from_secs(5);

fn ollama(version: Duration, tags: (&'static str, Duration), ps: Duration) -> String {
    let app = route(
        Router::new(),
        "/api/version",
        "ollama-version.json",
        200,
        version,
    );
    let app = route(app, "/api/tags", tags.0, 200, tags.1);
    serve(route(app, "/api/ps", "ollama-ps.json", 200, ps))
}

fn vllm(health: (&'static str, u16), models: (&'static str, Duration)) -> String {
    let app = route(Router::new(), "/health", health.0, health.1, FAST);
    serve(route(app, "/v1/models", models.0, 200, models.1))
}

fn localai(models: &'static str) -> String {
    let app = route(Router::new(), "/readyz", "localai-readyz.txt", 200, FAST);
    serve(route(app, "/v1/models", models, 200, FAST))
}

/// Every sample line's name and labels, to prove each series appears once.
fn series_keys(body: &str) -> Vec<&str> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' ').map(|(key, _)| key))
        .collect()
}

#[test]
fn probes_hold_up_against_what_real_servers_send() {
    let services = [
        // 0.1.0: a 5 s /api/ps or /v1/models turned these down (one 2 s timeout for all).
        (
            "ollama-slow-ps",
            "ollama",
            ollama(FAST, ("ollama-tags.json", FAST), SLOW),
        ),
        (
            "vllm-slow-models",
            "vllm",
            vllm(("vllm-health.txt", 200), ("vllm-models.json", SLOW)),
        ),
        // 0.1.0: 1.2 s + 1.2 s, each under the timeout, together over it.
        (
            "ollama-split",
            "ollama",
            ollama(
                Duration::from_millis(1200),
                ("ollama-tags.json", Duration::from_millis(1200)),
                FAST,
            ),
        ),
        // LocalAI lists a model twice when a config's name equals a file's name.
        (
            "localai-dup",
            "localai",
            localai("localai-models-duplicate.json"),
        ),
        // A LoRA adapter served under the base model's name: vLLM lists the id twice.
        (
            "vllm-dup",
            "vllm",
            vllm(
                ("vllm-health.txt", 200),
                ("vllm-models-duplicate.json", FAST),
            ),
        ),
        // A fresh install: no models.
        (
            "ollama-empty",
            "ollama",
            ollama(FAST, ("ollama-tags-empty.json", FAST), FAST),
        ),
        // Cloud models: listed by /api/tags, stored elsewhere.
        (
            "ollama-cloud",
            "ollama",
            ollama(FAST, ("ollama-tags-cloud.json", FAST), FAST),
        ),
        // The OpenAI base users copy into clients.
        (
            "vllm-v1",
            "vllm",
            format!(
                "{}/v1",
                vllm(("vllm-health.txt", 200), ("vllm-models.json", FAST))
            ),
        ),
        // An engine that died (503), and nginx's page for an upstream that is gone (502).
        (
            "vllm-dead",
            "vllm",
            vllm(("vllm-health-503.txt", 503), ("vllm-models.json", FAST)),
        ),
        (
            "ollama-proxied",
            "ollama",
            serve(route(
                Router::new(),
                "/api/version",
                "ollama-html-502.html",
                502,
                FAST,
            )),
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("exporter.yaml");
    let mut yaml = String::from("collectors: {docker: {enabled: false}}\nservices:\n");
    for (name, kind, url) in &services {
        yaml.push_str(&format!(
            "  - {{name: {name}, kind: {kind}, url: '{url}'}}\n"
        ));
    }
    std::fs::write(&config, yaml).unwrap();
    let exporter = Daemon::start(EXPORTER, &["--config.file", config.to_str().unwrap()]);
    let up = |body: &str, name: &str, kind: &str| {
        value(
            body,
            &format!(r#"aistack_service_up{{service="{name}",kind="{kind}"}}"#),
        )
    };
    // Two rounds, so the slow extras have failed at least once.
    let body = wait_for(Duration::from_secs(30), "two rounds of probes", || {
        let body = exporter.scrape().body;
        let errors = value(
            &body,
            r#"aistack_service_probe_errors_total{service="ollama-slow-ps",endpoint="/api/ps"}"#,
        )?;
        (errors >= 2.0).then_some(body)
    });

    for (name, kind, _) in &services {
        let want = if ["vllm-dead", "ollama-proxied"].contains(name) {
            0.0
        } else {
            1.0
        };
        assert_eq!(up(&body, name, kind), Some(want), "{name}\n{body}");
    }
    // The slow extra is counted; the fast one beside it still reports.
    assert!(
        value(
            &body,
            r#"aistack_service_probe_errors_total{service="vllm-slow-models",endpoint="/v1/models"}"#
        )
        .is_some_and(|n| n >= 2.0),
        "{body}"
    );
    assert!(
        body.contains(r#"aistack_ollama_model_size_bytes{service="ollama-slow-ps",model="gemma3:latest"} 3338801804"#),
        "{body}"
    );
    assert!(
        body.contains(r#"aistack_ollama_model_size_bytes{service="ollama-split",model="gemma3:latest"} 3338801804"#),
        "{body}"
    );
    assert!(
        value(
            &body,
            r#"aistack_service_probe_errors_total{service="vllm-dead",endpoint="/health"}"#
        )
        .is_some_and(|n| n >= 1.0),
        "{body}"
    );
    // /v1 dropped: the models of the server's root.
    assert!(
        body.contains(r#"aistack_service_model_info{service="vllm-v1",kind="vllm",model="Qwen/Qwen2.5-7B-Instruct"} 1"#),
        "{body}"
    );
    // A duplicated model: one series.
    let localai_models = body
        .lines()
        .filter(|l| l.starts_with(r#"aistack_service_model_info{service="localai-dup""#))
        .count();
    let listed: serde_json::Value =
        serde_json::from_str(&fixture("localai-models-duplicate.json")).unwrap();
    let ids: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    let distinct: HashSet<&str> = ids.iter().copied().collect();
    assert!(
        distinct.len() < ids.len(),
        "the fixture lists a model twice"
    );
    assert_eq!(localai_models, distinct.len(), "{body}");
    let vllm_models: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with(r#"aistack_service_model_info{service="vllm-dup""#))
        .collect();
    assert_eq!(vllm_models.len(), 1, "{body}");
    assert!(!body.contains(r#"aistack_ollama_model_size_bytes{service="ollama-empty""#));
    // Cloud models apart from local storage.
    let tags: serde_json::Value = serde_json::from_str(&fixture("ollama-tags-cloud.json")).unwrap();
    let models = tags["models"].as_array().unwrap();
    for model in models {
        let name = model["name"].as_str().unwrap();
        let size =
            format!(r#"aistack_ollama_model_size_bytes{{service="ollama-cloud",model="{name}"}}"#);
        match model["remote_host"].as_str() {
            Some(host) => {
                assert_eq!(
                    value(&body, &size),
                    None,
                    "{name} is no local model\n{body}"
                );
                let info = format!(
                    r#"aistack_ollama_remote_model_info{{service="ollama-cloud",model="{name}",remote_host="{host}"}}"#
                );
                assert_eq!(value(&body, &info), Some(1.0), "{body}");
            }
            None => assert_eq!(value(&body, &size), model["size"].as_f64(), "{body}"),
        }
    }
    assert!(models.iter().any(|m| m["remote_host"].is_string()));
    assert!(models.iter().any(|m| m["remote_host"].is_null()));

    // Every series once, in both formats, and both valid.
    let keys = series_keys(&body);
    let unique: HashSet<&str> = keys.iter().copied().collect();
    assert_eq!(unique.len(), keys.len(), "duplicate series:\n{body}");
    parse_openmetrics(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    let text = exporter.get("/metrics").body;
    check_text_format(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
}
