//! Fuzzing of what the exporter parses from outside, itself or through procfs-core: /proc and
//! /sys text, process command lines and cgroups, ethtool netlink replies, and its config file.
//! Inputs are random bytes and byte-level mutations of real samples (the fixture trees and
//! config files); the property is "never panics", plus what each parser promises.
//!
//! A short pass runs in ./tests/run. The long one, and the figures: docs/reliability.md
//! (`AISTACK_FUZZ_CASES=1000000 cargo test --release -p aistack-exporter --test fuzz`).

use aistack_exporter::collectors::cpu::parse_stat;
use aistack_exporter::collectors::docker::Health;
use aistack_exporter::collectors::gpu::attribution::{parse_cmdline, parse_container_id};
use aistack_exporter::collectors::idle::{established_on, net_dev_bytes, parse_loadavg};
use aistack_exporter::collectors::rapl::parse_u64;
use aistack_exporter::collectors::wol::{parse_wol_reply, wol_request};
use aistack_exporter::config::Config;
use aistack_tests::fixtures;
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("AISTACK_FUZZ_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(2000)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        ..ProptestConfig::default()
    }
}

fn read(path: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// One edit of a byte string: overwrite, insert, delete, or cut.
#[derive(Debug, Clone)]
enum Edit {
    Set(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
        any::<usize>().prop_map(Edit::Delete),
        any::<usize>().prop_map(Edit::Truncate),
    ]
}

/// Random bytes, or one of `seeds` with up to 8 edits.
fn input(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let count = seeds.len();
    prop_oneof![
        1 => proptest::collection::vec(any::<u8>(), 0..512),
        4 => (0..count, proptest::collection::vec(edit(), 0..8)).prop_map(move |(i, edits)| {
            let mut bytes = seeds[i].clone();
            for edit in edits {
                let at = |i: usize, len: usize| if len == 0 { 0 } else { i % len };
                match edit {
                    Edit::Set(i, b) if !bytes.is_empty() => {
                        let i = at(i, bytes.len());
                        bytes[i] = b;
                    }
                    Edit::Insert(i, b) => {
                        let i = at(i, bytes.len() + 1);
                        bytes.insert(i, b);
                    }
                    Edit::Delete(i) if !bytes.is_empty() => {
                        let i = at(i, bytes.len());
                        bytes.remove(i);
                    }
                    Edit::Truncate(i) => bytes.truncate(at(i, bytes.len() + 1)),
                    _ => {}
                }
            }
            bytes
        }),
    ]
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn proc_stat(bytes in input(vec![read("roots/t0/proc/stat"), read("roots/t1/proc/stat")])) {
        if let Ok(ticks) = parse_stat(&text(&bytes)) {
            prop_assert!(ticks.busy <= ticks.total);
        }
    }

    #[test]
    fn loadavg_and_sysfs_numbers(bytes in input(vec![
        read("roots/t0/proc/loadavg"),
        b"0.52 0.58 0.59 2/1187 83210\n".to_vec(),
        // procfs-core parses an f32: near its overflow, and past it.
        b"3.4e38 0.58 0.59 2/1187 83210\n".to_vec(),
        b"2e850000 0.58 0.59 2/1187 83210\n".to_vec(),
        b"262185000000\n".to_vec(),
        read("roots/t0/sys/class/powercap/intel-rapl:0/energy_uj"),
    ])) {
        let text = text(&bytes);
        if let Some(load) = parse_loadavg(&text) {
            prop_assert!(load.is_finite() && load >= 0.0, "{load}");
        }
        let _ = parse_u64(&text);
    }

    #[test]
    fn tcp_tables_and_net_dev(bytes in input(vec![
        read("roots/t0/proc/net/tcp"),
        read("roots/t0/proc/net/tcp6"),
        read("roots/t0/proc/net/dev"),
    ])) {
        // procfs-core's parsers, on what the idle gates read: an error, never a panic; a port
        // never has more established connections than the table has lines.
        let text = text(&bytes);
        if let Ok(counts) = established_on(&text, &[22, 11434]) {
            let lines = text.lines().count();
            prop_assert!(counts.iter().all(|(_, n)| *n > 0 && *n < lines.max(1)), "{counts:?}");
        }
        let _ = net_dev_bytes(&text, &["eth0".to_owned(), "lo".to_owned()]);
    }

    #[test]
    fn numbers_round_trip(n in any::<u64>(), pad in "[ \t\n]{0,3}") {
        prop_assert_eq!(parse_u64(&format!("{n}{pad}")), Some(n));
    }

    #[test]
    fn cgroups_and_command_lines(bytes in input(vec![
        read("roots/t0/proc/5021/cgroup"),
        read("roots/t0/proc/2165/cgroup"),
        read("roots/t0/proc/5021/cmdline"),
        b"0::/kubepods.slice/kubepods-burstable.slice/cri-containerd-3f2b9c0d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9.scope\n".to_vec(),
    ])) {
        if let Some(id) = parse_container_id(&text(&bytes)) {
            prop_assert_eq!(id.len(), 64);
            prop_assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        }
        let (argv0, joined) = parse_cmdline(&bytes);
        prop_assert!(!argv0.contains('/') && joined.len() <= bytes.len() * 3 + 1);
    }

    #[test]
    fn container_ids_are_found_wherever_the_runtime_puts_them(
        id in "[0-9a-f]{64}",
        prefix in prop_oneof![Just(""), Just("docker-"), Just("libpod-"), Just("cri-containerd-"), Just("crio-")],
        suffix in prop_oneof![Just(""), Just(".scope")],
        parent in "(/[a-z.-]{1,12}){0,3}",
    ) {
        let cgroup = format!("0::{parent}/{prefix}{id}{suffix}\n");
        prop_assert_eq!(parse_container_id(&cgroup), Some(id));
    }

    #[test]
    fn ethtool_replies(bytes in input(vec![wol_request("eth0"), wol_request("enp5s0")])) {
        // Malformed attributes are an error, never a read past the buffer.
        let _ = parse_wol_reply(&bytes);
    }

    #[test]
    fn docker_health_text(status in ".{0,40}") {
        let _ = Health::from_status_text(&status);
    }

    #[test]
    fn config_files(bytes in input(vec![
        read("config/exporter-good.yaml"),
        read("config/exporter-bad.yaml"),
        read("config/exporter-typo.yaml"),
    ])) {
        // Valid or a list of problems, each naming where; never a panic.
        if let Err(problems) = aistack_common::config::parse::<Config>(&text(&bytes)) {
            prop_assert!(!problems.is_empty());
        }
    }
}

#[test]
fn the_seeds_parse() {
    assert!(parse_stat(&text(&read("roots/t0/proc/stat"))).is_ok());
    assert_eq!(
        parse_loadavg(&text(&read("roots/t0/proc/loadavg"))),
        Some(0.51)
    );
    assert_eq!(
        established_on(&text(&read("roots/t0/proc/net/tcp6")), &[11434]).unwrap(),
        [(11434, 2)]
    );
    assert!(
        net_dev_bytes(&text(&read("roots/t0/proc/net/dev")), &["eth0".to_owned()]).unwrap() > 0
    );
    assert_eq!(
        parse_container_id(&text(&read("roots/t0/proc/5021/cgroup"))).map(|id| id.len()),
        Some(64)
    );
    assert!(
        aistack_common::config::parse::<Config>(&text(&read("config/exporter-good.yaml"))).is_ok()
    );
}
