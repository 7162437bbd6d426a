//! Attacks through the config: values check-config accepts that break the running actioner,
//! and secret files anyone may change.
//!
//! Each test's comment tells what the attack did before the code was mended; its name, what
//! must hold now.

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use aistack_actioner::alert::parse_payload;
use aistack_actioner::auth::Auth;
use aistack_actioner::config::Config;
use aistack_actioner::{Actioner, build_actions, check_files};
use aistack_common::config::Validate as _;

fn parse(yaml: &str) -> Config {
    aistack_common::config::parse(yaml).unwrap_or_else(|p| panic!("{p:?}"))
}

/// A cooldown of "300000000000y" parses (u64 seconds). `Policy::snapshot` computed
/// `last run + cooldown` as a SystemTime, which overflowed and panicked inside the recorder
/// after the rule's first run, and again at every start. check-config now refuses durations
/// past a year, and the arithmetic saturates for a config built any other way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_cooldown_does_not_kill_the_recorder() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = |cooldown: &str| {
        format!(
            r#"
host: gpu-box
state_dir: {}
auth: {{bearer_token_file: /dev/null}}
rules:
  - {{name: wake-nas, match: {{alertname: NasNeeded}}, action: wake, target: nas, cooldown: {cooldown}}}
actions:
  wake:
    targets:
      nas: {{mac: "aa:bb:cc:dd:ee:ff", broadcast: 127.0.0.1, port: 9}}
"#,
            dir.path().join("state").display()
        )
    };
    let refused = aistack_common::config::parse::<Config>(&yaml("300000000000y")).unwrap_err();
    assert_eq!(
        refused.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["rules[0].cooldown: must be at most a year (365d)"]
    );
    let mut config = parse(&yaml("1h"));
    config.rules[0].cooldown = Some(aistack_common::config::HumanDuration::from_secs(
        300_000_000_000 * 31_557_600,
    ));
    let mut problems = aistack_common::config::Problems::default();
    config.validate(&mut problems);
    assert!(!problems.into_vec().is_empty());
    let actioner = Actioner::start(
        &config,
        Auth::from_secrets("t", None, None),
        build_actions(&config).unwrap(),
    )
    .unwrap();
    let body = r#"{"version":"4","alerts":[{"status":"firing","labels":{"alertname":"NasNeeded"},"startsAt":"2026-11-22T21:00:00Z","fingerprint":"00000000000000a9"}]}"#;
    let _ = actioner
        .recorder
        .webhook(parse_payload(body.as_bytes()).unwrap())
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(actioner.recorder.health(), Ok(()));
}

/// A bearer token file anyone may write (mode 0622: not readable by others) passes the
/// secret-file check: any local user can replace the token (or the buttons' signing key)
/// before the next start.
#[test]
fn a_secret_file_anyone_can_write_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o622)).unwrap();
    let yaml = format!(
        "state_dir: {}\nauth: {{bearer_token_file: {}}}\n",
        dir.path().join("state").display(),
        token.display()
    );
    let config = parse(&yaml);
    assert!(
        check_files(&config, std::path::Path::new("actioner.yaml")).is_err(),
        "a world-writable token file is accepted"
    );
}
