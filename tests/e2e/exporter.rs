//! aistack-exporter end to end: the real binary on loopback, fixture roots, a real Prometheus,
//! the strict OpenMetrics parser.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use aistack_tests::{
    Daemon, PROMETHEUS_ACCEPT, Prometheus, check_text_format, copy_tree, fixtures, get_with,
    parse_openmetrics, run, wait_for,
};

const EXPORTER: &str = "aistack-exporter";

/// The value of the series whose line starts with `series ` (name and labels as printed).
fn value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

fn metrics(exporter: &Daemon) -> String {
    let reply = exporter.scrape();
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    reply.body
}

fn wait_for_series(exporter: &Daemon, series: &str) -> (f64, String) {
    wait_for(Duration::from_secs(15), series, || {
        let body = metrics(exporter);
        value(&body, series).map(|v| (v, body))
    })
}

#[test]
fn serves_strict_openmetrics_about_this_host() {
    let exporter = Daemon::start(EXPORTER, &[]);
    let (utilization, _) = wait_for_series(&exporter, "aistack_cpu_utilization_ratio");
    assert!((0.0..=1.0).contains(&utilization));
    let (watts, body) = wait_for_series(&exporter, "aistack_host_power_estimated_watts");
    assert!(watts >= 30.0, "baseline is 30 W: {watts}");

    let families = parse_openmetrics(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    assert!(families.contains(&"aistack_exporter_build_info".to_owned()));
    assert_eq!(
        value(&body, r#"aistack_collector_success{collector="cpu"}"#),
        Some(1.0)
    );
    assert!(
        value(
            &body,
            r#"aistack_collector_duration_seconds{collector="cpu"}"#
        )
        .is_some()
    );

    assert_eq!(exporter.get("/healthz").body, "ok");
    let landing = exporter.get("/");
    assert!(
        landing.body.contains(r#"<a href="/metrics">"#),
        "{}",
        landing.body
    );
    assert_eq!(exporter.get("/nope").status, 404);
}

#[test]
fn fixture_roots_give_the_expected_values_through_the_binary() {
    let root = tempfile::tempdir().unwrap();
    copy_tree(&fixtures().join("roots/t0"), root.path());
    let procfs = root.path().join("proc");
    let sysfs = root.path().join("sys");
    let exporter = Daemon::start(
        EXPORTER,
        &[
            "--path.procfs",
            procfs.to_str().unwrap(),
            "--path.sysfs",
            sysfs.to_str().unwrap(),
        ],
    );
    let (energy, body) = wait_for_series(
        &exporter,
        r#"aistack_cpu_package_energy_joules_total{package="0"}"#,
    );
    assert_eq!(energy, 262_130.0);
    assert_eq!(
        value(
            &body,
            r#"aistack_hwmon_temperature_celsius{chip="nvme_nvme1",sensor="Composite"}"#
        ),
        Some(35.85)
    );
    assert!(
        !body.contains(r#"package="2""#),
        "zone without energy_uj must be absent"
    );

    // One second later: the counters move, package 0 wraps.
    copy_tree(&fixtures().join("roots/t1"), root.path());
    let (utilization, _) = wait_for_series(&exporter, "aistack_cpu_utilization_ratio");
    assert_eq!(utilization, 0.25);
    let (energy, body) = wait_for(Duration::from_secs(10), "the wrapped counter", || {
        let body = metrics(&exporter);
        let v = value(
            &body,
            r#"aistack_cpu_package_energy_joules_total{package="0"}"#,
        )?;
        (v != 262_130.0).then_some((v, body))
    });
    assert_eq!(energy, 262_185.0, "55 J across the wrap");
    parse_openmetrics(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
}

/// Samples of a text exposition: name, labels, value (label values here need no unescaping).
fn samples(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let mut map = BTreeMap::new();
            let mut rest = labels;
            while let Some((key, after)) = rest.split_once("=\"") {
                let end = after.find('"').unwrap();
                map.insert(
                    key.trim_start_matches(',').to_owned(),
                    after[..end].to_owned(),
                );
                rest = &after[end + 1..];
            }
            (name.to_owned(), map, value.parse().unwrap())
        })
        .collect()
}

fn upstream(path: &str) -> std::path::PathBuf {
    fixtures().join("upstream").join(path)
}

fn start_on_upstream(sysfs: &str, procfs: &str) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("exporter.yaml");
    std::fs::write(&config, "collectors: {docker: {enabled: false}}\n").unwrap();
    let exporter = Daemon::start(
        EXPORTER,
        &[
            "--config.file",
            config.to_str().unwrap(),
            "--path.sysfs",
            upstream(sysfs).to_str().unwrap(),
            "--path.procfs",
            upstream(procfs).to_str().unwrap(),
        ],
    );
    drop(dir); // read at start
    exporter
}

/// node_exporter's own sysfs fixture tree (tests/fixtures/upstream), and what node_exporter's
/// end-to-end test says it holds (its e2e-output.txt): every hwmon temperature and the RAPL
/// package match, one for one. Chips are named differently (node_exporter: the device path;
/// aistack: the chip's `name`, with the device when two share it) and aistack names a sensor
/// by its label where the chip labels it uniquely; the values and the count must agree.
#[test]
fn node_exporters_sysfs_tree_gives_what_node_exporter_reports() {
    let reference = std::fs::read_to_string(upstream("node_exporter/e2e-output.txt")).unwrap();
    let reference = samples(&reference);
    let exporter = start_on_upstream("node_exporter/sys", "node_exporter/proc");
    let (_, body) = wait_for_series(&exporter, r#"aistack_collector_success{collector="hwmon"}"#);
    let ours = samples(&body);

    let chip_name: BTreeMap<&str, &str> = reference
        .iter()
        .filter(|(n, _, _)| n == "node_hwmon_chip_names")
        .map(|(_, l, _)| (l["chip"].as_str(), l["chip_name"].as_str()))
        .collect();
    let label = |chip: &str, sensor: &str| {
        reference
            .iter()
            .find(|(n, l, _)| {
                n == "node_hwmon_sensor_label" && l["chip"] == chip && l["sensor"] == sensor
            })
            .map(|(_, l, _)| l["label"].as_str())
    };
    let mut ours_left: Vec<(&str, &str, f64)> = ours
        .iter()
        .filter(|(n, _, _)| n == "aistack_hwmon_temperature_celsius")
        .map(|(_, l, v)| (l["chip"].as_str(), l["sensor"].as_str(), *v))
        .collect();
    let theirs: Vec<_> = reference
        .iter()
        .filter(|(n, _, _)| n == "node_hwmon_temp_celsius")
        .collect();
    assert_eq!(theirs.len(), 15, "node_exporter's tree has 15 temperatures");
    assert_eq!(ours_left.len(), theirs.len(), "{body}");
    for (_, l, value) in theirs {
        let (chip, sensor) = (l["chip"].as_str(), l["sensor"].as_str());
        let name = chip_name.get(chip).copied().unwrap_or(chip);
        // A label names the sensor when no other sensor of the chip has it.
        let labels_alike = |x: &str| {
            reference
                .iter()
                .filter(|(n, m, _)| {
                    n == "node_hwmon_sensor_label" && m["chip"] == chip && m["label"] == x
                })
                .count()
        };
        let want_sensor = match label(chip, sensor) {
            Some(x) if labels_alike(x) == 1 => x,
            _ => sensor,
        };
        let at = ours_left
            .iter()
            .position(|(c, s, v)| {
                (*c == name || c.starts_with(&format!("{name}_")))
                    && *s == want_sensor
                    && v == value
            })
            .unwrap_or_else(|| {
                panic!("node_exporter's {chip}/{sensor} = {value} ({name}, {want_sensor}) is not in ours: {ours_left:?}")
            });
        ours_left.remove(at);
    }

    let package =
        |name: &str, rows: &[(String, BTreeMap<String, String>, f64)], index: &str, key: &str| {
            rows.iter()
                .find(|(n, l, _)| n == name && l[key] == index)
                .map(|(_, _, v)| *v)
        };
    let theirs = package("node_rapl_package_joules_total", &reference, "0", "index");
    assert_eq!(theirs, Some(240_422.366_267));
    assert_eq!(
        package(
            "aistack_cpu_package_energy_joules_total",
            &ours,
            "0",
            "package"
        ),
        theirs
    );
}

/// prometheus/procfs's fixtures: its powercap tree has package 10 as `intel-rapl:a` (which
/// node_exporter reads as index 10, and 0.1.0 skipped), and its /proc/stat has a 131 962-byte
/// `intr` line (on which Debian's node_exporter 1.5.0 fails its cpu collector).
#[test]
fn procfs_trees_give_what_node_exporter_reports() {
    let reference = std::fs::read_to_string(upstream("procfs/reference-debian-rapl.txt")).unwrap();
    let reference = samples(&reference);
    let exporter = start_on_upstream("procfs/sys", "procfs/proc");
    wait_for_series(&exporter, r#"aistack_collector_success{collector="cpu"}"#);
    let body = wait_for(Duration::from_secs(15), "both packages", || {
        let body = metrics(&exporter);
        body.contains(r#"package="10""#).then_some(body)
    });
    let ours = samples(&body);
    let theirs: Vec<(&str, f64)> = reference
        .iter()
        .filter(|(n, _, _)| n == "node_rapl_package_joules_total")
        .map(|(_, l, v)| (l["index"].as_str(), *v))
        .collect();
    assert_eq!(theirs.len(), 2, "{reference:?}");
    for (index, joules) in theirs {
        assert_eq!(
            value(
                &body,
                &format!(r#"aistack_cpu_package_energy_joules_total{{package="{index}"}}"#)
            ),
            Some(joules),
            "package {index}\n{body}"
        );
    }
    let packages = ours
        .iter()
        .filter(|(n, _, _)| n == "aistack_cpu_package_energy_joules_total")
        .count();
    assert_eq!(packages, 2, "sub-zones are no packages\n{body}");
    assert_eq!(
        value(&body, r#"aistack_collector_success{collector="cpu"}"#),
        Some(1.0),
        "{body}"
    );
}

/// A host with 12 packages: the kernel names packages 10 and 11 `intel-rapl:a` and
/// `intel-rapl:b` (`"%s:%x"`); 0.1.0 read only decimal ids and undercounted CPU power.
#[test]
fn rapl_zones_with_hex_ids_count() {
    let root = tempfile::tempdir().unwrap();
    copy_tree(&fixtures().join("roots/t0"), root.path());
    let powercap = root.path().join("sys/class/powercap");
    for (id, joules) in [(10_u32, 1000_u64), (11, 2000)] {
        for zone in [format!("intel-rapl:{id:x}"), format!("intel-rapl:{id:x}:0")] {
            let dir = powercap.join(&zone);
            std::fs::create_dir_all(&dir).unwrap();
            let name = if zone.matches(':').count() == 1 {
                format!("package-{id}")
            } else {
                "dram".into()
            };
            std::fs::write(dir.join("name"), format!("{name}\n")).unwrap();
            std::fs::write(dir.join("energy_uj"), format!("{}\n", joules * 1_000_000)).unwrap();
            std::fs::write(dir.join("max_energy_range_uj"), "262143328850\n").unwrap();
        }
    }
    let exporter = Daemon::start(
        EXPORTER,
        &[
            "--path.procfs",
            root.path().join("proc").to_str().unwrap(),
            "--path.sysfs",
            root.path().join("sys").to_str().unwrap(),
        ],
    );
    let (energy, body) = wait_for_series(
        &exporter,
        r#"aistack_cpu_package_energy_joules_total{package="10"}"#,
    );
    assert_eq!(energy, 1000.0);
    assert_eq!(
        value(
            &body,
            r#"aistack_cpu_package_energy_joules_total{package="11"}"#
        ),
        Some(2000.0)
    );
    assert_eq!(
        value(
            &body,
            r#"aistack_cpu_package_energy_joules_total{package="0"}"#
        ),
        Some(262_130.0)
    );
    assert!(!body.contains("dram"), "{body}");
}

/// Prometheus asks for OpenMetrics and gets it; curl, older agents and anything that asks for
/// the classic text format get that, valid for promtool; gzip when asked.
#[test]
fn negotiates_openmetrics_the_classic_format_and_gzip() {
    let root = tempfile::tempdir().unwrap();
    copy_tree(&fixtures().join("roots/t0"), root.path());
    let exporter = Daemon::start(
        EXPORTER,
        &[
            "--path.procfs",
            root.path().join("proc").to_str().unwrap(),
            "--path.sysfs",
            root.path().join("sys").to_str().unwrap(),
        ],
    );
    let (_, openmetrics) = wait_for_series(
        &exporter,
        r#"aistack_cpu_package_energy_joules_total{package="0"}"#,
    );
    parse_openmetrics(&openmetrics).unwrap_or_else(|e| panic!("{e}\n{openmetrics}"));
    assert!(openmetrics.contains("# TYPE aistack_cpu_package_energy_joules counter\n"));

    for accept in [None, Some("text/plain;version=0.0.4"), Some("*/*")] {
        let headers: Vec<(&str, &str)> = accept.iter().map(|a| ("accept", *a)).collect();
        let reply = get_with(&exporter.url("/metrics"), &headers);
        assert_eq!(reply.status, 200);
        assert_eq!(
            reply.content_type, "text/plain; version=0.0.4; charset=utf-8",
            "{accept:?}"
        );
        let text = reply.body;
        check_text_format(&text).unwrap_or_else(|e| panic!("{accept:?}: {e}\n{text}"));
        assert!(!text.contains("# EOF"), "{text}");
        assert!(!text.contains("# UNIT"), "{text}");
        assert!(
            text.contains("# TYPE aistack_cpu_package_energy_joules_total counter\n"),
            "{text}"
        );
        assert_eq!(
            value(
                &text,
                r#"aistack_cpu_package_energy_joules_total{package="0"}"#
            ),
            Some(262_130.0)
        );
    }

    // gzip, as Prometheus asks for it: the same document, compressed.
    for (accept, content_type) in [
        (
            PROMETHEUS_ACCEPT,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        ("text/plain", "text/plain; version=0.0.4; charset=utf-8"),
    ] {
        let mut response = ureq::get(&exporter.url("/metrics"))
            .header("accept", accept)
            .header("accept-encoding", "gzip")
            .call()
            .unwrap();
        let header = |name| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        assert_eq!(header("content-encoding"), "gzip");
        assert_eq!(header("content-type"), content_type);
        assert!(
            header("vary").contains("Accept-Encoding"),
            "{}",
            header("vary")
        );
        let compressed = response.body_mut().read_to_vec().unwrap();
        let mut body = String::new();
        std::io::Read::read_to_string(
            &mut flate2::read::GzDecoder::new(&compressed[..]),
            &mut body,
        )
        .unwrap();
        assert!(
            compressed.len() * 3 < body.len(),
            "{} -> {}",
            body.len(),
            compressed.len()
        );
        if accept == PROMETHEUS_ACCEPT {
            parse_openmetrics(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
        } else {
            check_text_format(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
        }
    }
    // Refused gzip is not sent.
    let mut response = ureq::get(&exporter.url("/metrics"))
        .header("accept-encoding", "gzip;q=0, identity")
        .call()
        .unwrap();
    assert!(response.headers().get("content-encoding").is_none());
    let text = response.body_mut().read_to_string().unwrap();
    check_text_format(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
}

#[test]
fn missing_roots_degrade_to_no_data_quietly() {
    let exporter = Daemon::start(
        EXPORTER,
        &[
            "--path.procfs",
            "/nonexistent/proc",
            "--path.sysfs",
            "/nonexistent/sys",
        ],
    );
    let quiet = ["cpu", "rapl", "hwmon", "power", "gpu", "wol"];
    let series = |c: &str| format!(r#"aistack_collector_success{{collector="{c}"}}"#);
    let body = wait_for(
        Duration::from_secs(15),
        "every collector's first sample",
        || {
            let body = metrics(&exporter);
            quiet
                .iter()
                .all(|c| value(&body, &series(c)).is_some())
                .then_some(body)
        },
    );
    for collector in quiet {
        assert_eq!(
            value(
                &body,
                &format!(r#"aistack_collector_success{{collector="{collector}"}}"#)
            ),
            Some(0.0),
            "{collector}"
        );
    }
    parse_openmetrics(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    std::thread::sleep(Duration::from_millis(1500));
    let noisy: Vec<String> = exporter
        .log()
        .into_iter()
        .filter(|l| l.contains(r#""level":"WARN""#) || l.contains(r#""level":"ERROR""#))
        .collect();
    assert!(
        noisy.is_empty(),
        "absent hardware must not warn: {noisy:#?}"
    );
}

#[test]
fn garbage_in_proc_fails_the_collector_once_loudly_then_quietly() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("proc")).unwrap();
    std::fs::write(root.path().join("proc/stat"), "cpu  lots of ticks\n").unwrap();
    let exporter = Daemon::start(
        EXPORTER,
        &[
            "--path.procfs",
            root.path().join("proc").to_str().unwrap(),
            "--no-collector.power",
        ],
    );
    let (success, _) = wait_for_series(&exporter, r#"aistack_collector_success{collector="cpu"}"#);
    assert_eq!(success, 0.0);
    std::thread::sleep(Duration::from_millis(2500));
    let warnings = exporter
        .log()
        .into_iter()
        .filter(|l| l.contains(r#""level":"WARN""#) && l.contains("collector failed"))
        .count();
    assert_eq!(
        warnings,
        1,
        "the same error warns once: {:#?}",
        exporter.log()
    );
    assert_eq!(exporter.get("/healthz").status, 200);
}

#[test]
fn an_unprivileged_exporter_treats_a_root_only_rapl_zone_as_no_data() {
    if !Command::new("id")
        .arg("-u")
        .output()
        .unwrap()
        .stdout
        .starts_with(b"0\n")
    {
        eprintln!(
            "skipped: needs root to prepare a root-only energy_uj (./tests/run runs as root)"
        );
        return;
    }
    let root = tempfile::tempdir().unwrap();
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    copy_tree(&fixtures().join("roots/t0"), root.path());
    let zone1 = root
        .path()
        .join("sys/class/powercap/intel-rapl:1/energy_uj");
    std::fs::set_permissions(&zone1, std::fs::Permissions::from_mode(0o400)).unwrap();

    let mut as_nobody = Command::new("setpriv");
    as_nobody
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(aistack_tests::binary(EXPORTER));
    let sysfs = root.path().join("sys");
    let exporter = Daemon::start_with(as_nobody, &["--path.sysfs", sysfs.to_str().unwrap()]);
    let (_, body) = wait_for_series(
        &exporter,
        r#"aistack_cpu_package_energy_joules_total{package="0"}"#,
    );
    assert_eq!(
        value(&body, r#"aistack_collector_success{collector="rapl"}"#),
        Some(1.0)
    );
    assert!(
        !body.contains(r#"package="1""#),
        "root-only zone must be absent:\n{body}"
    );

    // Every package root-only (a kernel >= 5.10 without root): no data, success 0, no warning.
    let zone0 = root
        .path()
        .join("sys/class/powercap/intel-rapl:0/energy_uj");
    std::fs::set_permissions(&zone0, std::fs::Permissions::from_mode(0o400)).unwrap();
    wait_for(Duration::from_secs(10), "rapl to report no data", || {
        let body = metrics(&exporter);
        (value(&body, r#"aistack_collector_success{collector="rapl"}"#) == Some(0.0)).then_some(())
    });
    let warned = exporter
        .log()
        .iter()
        .any(|l| l.contains(r#""level":"WARN""#));
    assert!(!warned, "{:#?}", exporter.log());
}

#[test]
fn a_real_prometheus_scrapes_it_without_errors() {
    let exporter = Daemon::start(EXPORTER, &[]);
    let prometheus = Prometheus::start(&[("aistack", &exporter.address)]);
    wait_for(
        Duration::from_secs(30),
        "a scrape with cpu utilization",
        || {
            let result = prometheus.query("aistack_cpu_utilization_ratio");
            (!result.is_empty()).then_some(())
        },
    );
    let targets = prometheus.api("targets");
    let target = &targets["data"]["activeTargets"][0];
    assert_eq!(target["health"], "up", "{target}");
    assert_eq!(target["lastError"], "", "{target}");
    let samples = prometheus.query(r#"scrape_samples_scraped{job="aistack"}"#);
    let scraped: f64 = samples[0]["value"][1].as_str().unwrap().parse().unwrap();
    assert!(scraped >= 8.0, "{samples:?}");
    // Counters arrive as counters: rate() works on the energy estimate.
    wait_for(
        Duration::from_secs(30),
        "a rate over the energy counter",
        || {
            let r = prometheus.query("rate(aistack_host_energy_estimated_joules_total[5s])");
            (!r.is_empty()).then_some(())
        },
    );
}

#[test]
fn collector_flags_switch_collectors() {
    let exporter = Daemon::start(EXPORTER, &["--no-collector.hwmon", "--no-collector.rapl"]);
    let (_, body) = wait_for_series(&exporter, r#"aistack_collector_success{collector="cpu"}"#);
    assert!(!body.contains(r#"collector="hwmon""#), "{body}");
    assert!(!body.contains(r#"collector="rapl""#), "{body}");

    let (code, help, _) = run(EXPORTER, &["--help"]);
    assert_eq!(code, 0);
    for flag in [
        "--collector.cpu",
        "--no-collector.power",
        "--web.telemetry-path",
        "--path.sysfs",
        "check-config",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help:\n{help}");
    }
    let (code, version, _) = run(EXPORTER, &["--version"]);
    assert_eq!(code, 0);
    assert!(version.starts_with("aistack-exporter 0."), "{version}");
    let (code, _, err) = run(EXPORTER, &["--collector.nope"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn custom_telemetry_path_and_config_file() {
    let config = fixtures().join("config/exporter-good.yaml");
    let exporter = Daemon::start(
        EXPORTER,
        &[
            "--web.telemetry-path",
            "/prom",
            "--config.file",
            config.to_str().unwrap(),
        ],
    );
    assert_eq!(exporter.get("/metrics").status, 404);
    let body = wait_for(Duration::from_secs(10), "cpu success", || {
        let body = exporter.get("/prom").body;
        body.contains(r#"aistack_collector_success{collector="cpu"}"#)
            .then_some(body)
    });
    assert!(
        !body.contains(r#"collector="hwmon""#),
        "disabled in the config file:\n{body}"
    );
}

#[test]
fn the_telemetry_path_cannot_take_another_endpoint() {
    for path in ["/healthz", "/api/v1/idle", "/api/v1/gpu", "/{any}"] {
        let (code, _, err) = run(EXPORTER, &["--web.telemetry-path", path]);
        assert_eq!(code, 2, "{path}: {err}");
        assert!(err.contains("--web.telemetry-path"), "{err}");
    }
}

#[test]
fn idle_sockets_past_the_connection_cap_do_not_lock_out_a_scrape() {
    let exporter = Daemon::start(
        EXPORTER,
        &[
            "--web.max-connections",
            "4",
            "--web.read-header-timeout",
            "2s",
            "--no-collector.docker",
        ],
    );
    let listening = wait_for(Duration::from_secs(5), "the listening line", || {
        exporter
            .log()
            .into_iter()
            .find(|l| l.contains(r#""message":"listening""#))
    });
    assert!(listening.contains(r#""max_connections":4"#), "{listening}");
    // Forty clients connect and say nothing; a scrape still gets through, at once.
    let idle: Vec<std::net::TcpStream> = (0..40)
        .map(|_| std::net::TcpStream::connect(&exporter.address).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let started = std::time::Instant::now();
    assert_eq!(exporter.get("/healthz").status, 200);
    assert!(metrics(&exporter).contains("aistack_exporter_build_info"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    drop(idle);
}

#[test]
fn check_config_reports_every_problem_with_its_path() {
    let path = |name: &str| {
        fixtures()
            .join("config")
            .join(name)
            .to_str()
            .unwrap()
            .to_owned()
    };

    let (code, out, err) = run(
        EXPORTER,
        &["check-config", "--config.file", &path("exporter-good.yaml")],
    );
    assert_eq!((code, err.as_str()), (0, ""), "{out}");
    assert!(out.ends_with("exporter-good.yaml: ok\n"), "{out}");

    let (code, _, err) = run(
        EXPORTER,
        &["check-config", "--config.file", &path("exporter-bad.yaml")],
    );
    assert_eq!(code, 1);
    assert_eq!(
        err.lines().collect::<Vec<_>>(),
        [
            "collectors.cpu.interval: must be at least 100ms",
            "collectors.gpux: unknown collector; known: cpu, rapl, hwmon, gpu, power, docker, services, wol, logind, idle",
            "collectors.rapl.timeout: must be more than 0 and at most the interval (1s)",
            "power_estimation.baseline_watts: must be a number of watts >= 0, got -30",
        ]
    );

    let (code, _, err) = run(
        EXPORTER,
        &["check-config", "--config.file", &path("exporter-typo.yaml")],
    );
    assert_eq!(code, 1);
    assert!(
        err.starts_with("collectors.cpu.intervall: unknown field `intervall`"),
        "{err}"
    );

    let (code, _, err) = run(
        EXPORTER,
        &["check-config", "--config.file", "/nonexistent.yaml"],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot read config file /nonexistent.yaml"),
        "{err}"
    );

    // Serving refuses a bad config too, with the same problems.
    let (code, _, err) = run(
        EXPORTER,
        &[
            "--config.file",
            &path("exporter-bad.yaml"),
            "--web.listen-address",
            "127.0.0.1:0",
        ],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("collectors.cpu.interval: must be at least 100ms"),
        "{err}"
    );
}

#[test]
fn sigterm_shuts_down_cleanly() {
    let exporter = Daemon::start(EXPORTER, &[]);
    wait_for_series(&exporter, r#"aistack_collector_success{collector="cpu"}"#);
    let status = exporter.terminate();
    assert!(status.success(), "{status:?}");
}

/// Threads of a process, from /proc.
fn threads(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap()
}

#[test]
fn a_sensor_read_that_never_returns_does_not_hold_up_scrapes_or_other_collectors() {
    // A FIFO without a writer blocks open() forever, like a wedged I2C hwmon driver.
    let root = tempfile::tempdir().unwrap();
    copy_tree(&fixtures().join("roots/t0"), root.path());
    let sensor = root.path().join("sys/class/hwmon/hwmon3/temp1_input");
    std::fs::remove_file(&sensor).unwrap();
    assert!(
        Command::new("mkfifo")
            .arg(&sensor)
            .status()
            .unwrap()
            .success()
    );
    let config = root.path().join("exporter.yaml");
    std::fs::write(
        &config,
        "collectors:\n  hwmon: {interval: 500ms, timeout: 200ms}\n",
    )
    .unwrap();

    let sysfs = root.path().join("sys");
    let exporter = Daemon::start(
        EXPORTER,
        &[
            "--path.sysfs",
            sysfs.to_str().unwrap(),
            "--config.file",
            config.to_str().unwrap(),
        ],
    );
    let (success, _) =
        wait_for_series(&exporter, r#"aistack_collector_success{collector="hwmon"}"#);
    assert_eq!(success, 0.0);
    let early = threads(exporter.pid());
    std::thread::sleep(Duration::from_secs(6));

    // Twelve hwmon intervals later: still one stuck read, not twelve, and the others sample on.
    let body = metrics(&exporter);
    assert_eq!(
        value(&body, r#"aistack_collector_success{collector="hwmon"}"#),
        Some(0.0)
    );
    assert_eq!(
        value(&body, r#"aistack_collector_success{collector="cpu"}"#),
        Some(1.0)
    );
    assert_eq!(
        value(&body, r#"aistack_collector_success{collector="rapl"}"#),
        Some(1.0)
    );
    let late = threads(exporter.pid());
    assert!(late <= early + 1, "threads grew from {early} to {late}");
    let timeouts = exporter
        .log()
        .iter()
        .filter(|l| l.contains(r#""level":"WARN""#) && l.contains("timed out"))
        .count();
    assert_eq!(timeouts, 1, "{:#?}", exporter.log());
}

/// `aistack-exporter healthcheck`, as container health checks run it: 0 while the exporter
/// answers, 1 with one line once it is gone.
#[test]
fn healthcheck_says_whether_the_exporter_answers() {
    let exporter = Daemon::start(EXPORTER, &[]);
    let address = exporter.address.clone();
    let (code, stdout, stderr) = run(EXPORTER, &["healthcheck", "--web.listen-address", &address]);
    assert_eq!((code, stdout.as_str(), stderr.as_str()), (0, "", ""));
    assert!(exporter.terminate().success());
    let (code, _, stderr) = run(EXPORTER, &["healthcheck", "--web.listen-address", &address]);
    assert_eq!(code, 1);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "aistack-exporter healthcheck: http://{address}/healthz: connect:"
        )),
        "{stderr}"
    );
    // Another program on the port (an HTTP server answering 404 at /healthz) is no exporter.
    let other = aistack_tests::serve(axum::Router::new());
    let address = other.trim_start_matches("http://");
    let (code, _, stderr) = run(EXPORTER, &["healthcheck", "--web.listen-address", address]);
    assert_eq!(code, 1);
    assert!(
        stderr.trim_end().ends_with("/healthz: HTTP 404"),
        "{stderr}"
    );
}

/// An image or host without CA certificates (0.1.0 exited: "building the HTTP client: builder
/// error"): the exporter starts, warns once, and probes http:// services; https:// ones fail.
#[test]
fn without_ca_certificates_the_exporter_starts_and_says_why_https_fails() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("exporter.yaml");
    std::fs::write(
        &config,
        "collectors: {docker: {enabled: false}}\nservices:\n  - {name: web, kind: http, url: 'https://127.0.0.1:9/'}\n",
    )
    .unwrap();
    let mut command = Command::new(aistack_tests::binary(EXPORTER));
    command
        .env("SSL_CERT_FILE", dir.path().join("no-such-bundle.pem"))
        .env("SSL_CERT_DIR", dir.path().join("no-such-dir"));
    let exporter = Daemon::start_with(command, &["--config.file", config.to_str().unwrap()]);
    let (up, _) = wait_for_series(
        &exporter,
        r#"aistack_service_up{service="web",kind="http"}"#,
    );
    assert_eq!(up, 0.0);
    let warned = exporter
        .log()
        .iter()
        .filter(|l| l.contains("no usable CA certificates"))
        .count();
    assert_eq!(warned, 1, "{:#?}", exporter.log());
}
