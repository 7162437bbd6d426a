//! What the actioner's integration tests share: a config and a started actioner, calls to its
//! API, webhooks, the journal read back, and stand-ins for the actions a test must time.

// Each test binary uses the part it needs.
#![allow(dead_code)]

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aistack_actioner::actions::{Action, ActionError, Job, RunContext};
use aistack_actioner::auth::Auth;
use aistack_actioner::config::Config;
use aistack_actioner::journal::{Event, Journal, JournalEntry, JournalLimits};
use aistack_actioner::vocab::ActionKind;
use aistack_actioner::{Actioner, BuiltActions, build_actions};
use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use futures_util::future::BoxFuture;
use http_body_util::BodyExt;
use tower::ServiceExt;

/// The bearer token of every test actioner.
pub const TOKEN: &str = "0123456789abcdef";

/// A game starts (failover) and ends (failback).
pub const GAMING_RULES: &str = "  - {name: failover, match: {alertname: Gaming}, on: firing, action: failover}\n  - {name: failback, match: {alertname: Gaming}, on: resolved, action: failback}";

/// [`GAMING_RULES`] as the rules' own dry runs.
pub const GAMING_DRY_RULES: &str = "  - {name: failover, match: {alertname: Gaming}, on: firing, action: failover, dry_run: true}\n  - {name: failback, match: {alertname: Gaming}, on: resolved, action: failback, dry_run: true}";

/// `actions.failover` for Docker (under `actions:`).
pub const DOCKER_FAILOVER: &str = "  failover:\n    docker: {primary: vllm, fallback: ollama}";

/// A config with the `wake-nas` rule and `nas` wake target, plus `rules` and `actions` (YAML
/// list items and `actions:` entries, indented two spaces).
pub fn config(state: &Path, rules: &str, actions: &str) -> Config {
    let yaml = format!(
        r#"
host: gpu-box
state_dir: {state}
auth: {{bearer_token_file: /dev/null}}
rules:
  - {{name: wake-nas, match: {{alertname: NasNeeded}}, action: wake, target: nas}}
{rules}
actions:
  wake:
    targets:
      nas: {{mac: "aa:bb:cc:dd:ee:ff", broadcast: 127.0.0.1, port: 9}}
{actions}
"#,
        state = state.display(),
    );
    aistack_common::config::parse(&yaml).unwrap_or_else(|p| panic!("{p:?}"))
}

/// The actioner of `config` with `built` actions, answering [`TOKEN`].
pub fn start_with(config: &Config, built: BuiltActions) -> Actioner {
    Actioner::start(config, Auth::from_secrets(TOKEN, None, None), built).unwrap()
}

/// The actioner of `config` with its real actions, answering [`TOKEN`].
pub fn start(config: &Config) -> Actioner {
    start_with(config, build_actions(config).unwrap())
}

/// Every entry of the journal in `dir`, oldest first.
pub fn read_journal(dir: &Path) -> Vec<JournalEntry> {
    let mut entries = Vec::new();
    Journal::open(dir, JournalLimits::default(), |e| entries.push(e)).unwrap();
    entries
}

/// Journals, in `state`, a failover that succeeded earlier: inference is on the fallback.
pub fn failed_over_before(state: &Path) {
    let (mut journal, _) = Journal::open(state, JournalLimits::default(), drop).unwrap();
    let mut history: Vec<JournalEntry> = [Event::Planned, Event::Started, Event::Succeeded]
        .into_iter()
        .map(|event| JournalEntry {
            key: Some("failover|f0|2026-11-22T20:00:00Z|firing".into()),
            rule: Some("failover".into()),
            action: Some(ActionKind::Failover),
            ..JournalEntry::new(event)
        })
        .collect();
    journal.append(&mut history).unwrap();
}

/// An Alertmanager webhook (version 4) carrying `alerts`, JSON objects joined by commas.
pub fn webhook(alerts: &str) -> String {
    format!(
        r#"{{"version":"4","groupKey":"{{}}:{{}}","status":"firing","receiver":"aistack","externalURL":"http://am:9093","alerts":[{alerts}]}}"#
    )
}

/// One alert of a webhook, as Alertmanager sends it.
pub fn alert(name: &str, fingerprint: &str, starts_at: &str, status: &str) -> String {
    format!(
        r#"{{"status":"{status}","labels":{{"alertname":"{name}","instance":"gpu-box:9470","severity":"warning"}},"annotations":{{"summary":"s"}},"startsAt":"{starts_at}","endsAt":"0001-01-01T00:00:00Z","generatorURL":"http://prom/graph","fingerprint":"{fingerprint}"}}"#
    )
}

/// A webhook of one alert that started at 21:00.
pub fn one_alert(name: &str, fingerprint: &str, status: &str) -> String {
    webhook(&alert(name, fingerprint, "2026-11-22T21:00:00Z", status))
}

/// A request to `router`: its status and JSON answer (`null` when the answer is not JSON).
pub async fn call(
    router: &Router,
    method: &str,
    path: &str,
    auth: Option<&str>,
    content_type: Option<&str>,
    body: String,
) -> (StatusCode, serde_json::Value) {
    let mut request = Request::builder().method(method).uri(path);
    if let Some(auth) = auth {
        request = request.header("authorization", auth);
    }
    if let Some(ct) = content_type {
        request = request.header("content-type", ct);
    }
    let response = router
        .clone()
        .oneshot(request.body(Body::from(body)).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

/// `call` as an API client with the bearer token (and a JSON body, when there is one).
pub async fn api(
    router: &Router,
    method: &str,
    path: &str,
    body: impl Into<String>,
) -> (StatusCode, serde_json::Value) {
    let body = body.into();
    let bearer = format!("Bearer {TOKEN}");
    let content_type = (!body.is_empty()).then_some("application/json");
    call(router, method, path, Some(&bearer), content_type, body).await
}

/// POSTs `body` to `path` as an API client, and wants 200.
pub async fn post_ok(router: &Router, path: &str, body: impl Into<String>) {
    let (status, answer) = api(router, "POST", path, body).await;
    assert_eq!(status, StatusCode::OK, "POST {path}: {answer}");
}

/// One run of a stand-in action.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    pub kind: ActionKind,
    pub began: Instant,
    pub ended: Instant,
}

/// The runs of the stand-ins, in the order they ended.
#[derive(Debug, Clone, Default)]
pub struct Runs(Arc<Mutex<Vec<Run>>>);

impl Runs {
    pub fn all(&self) -> Vec<Run> {
        self.0.lock().unwrap().clone()
    }

    pub fn kinds(&self) -> Vec<ActionKind> {
        self.all().iter().map(|r| r.kind).collect()
    }
}

/// Replaces each action of `took` in `built` with a stand-in that takes that long, succeeds
/// and records its run.
pub fn stand_ins(built: &mut BuiltActions, took: &[(ActionKind, Duration)]) -> Runs {
    let runs = Runs::default();
    for &(kind, took) in took {
        let stand_in = StandIn {
            kind,
            took,
            runs: runs.clone(),
        };
        built.actions.insert(kind, Arc::new(stand_in));
    }
    runs
}

struct StandIn {
    kind: ActionKind,
    took: Duration,
    runs: Runs,
}

impl Action for StandIn {
    fn kind(&self) -> ActionKind {
        self.kind
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(30)
    }

    fn describe(&self, _job: &Job) -> String {
        format!("would {}", self.kind)
    }

    fn run<'a>(
        &'a self,
        _job: &'a Job,
        _context: &'a RunContext,
    ) -> BoxFuture<'a, Result<String, ActionError>> {
        Box::pin(async move {
            let began = Instant::now();
            tokio::time::sleep(self.took).await;
            let run = Run {
                kind: self.kind,
                began,
                ended: Instant::now(),
            };
            self.runs.0.lock().unwrap().push(run);
            Ok(format!("{} done", self.kind))
        })
    }
}
