//! What one full GPU sample costs: every field and both process lists of every GPU through
//! NVML, plus attributing the processes — the work the `gpu` collector does each interval.
//!
//! ```sh
//! cargo run --release -p aistack-exporter --example gpu_sample_cost -- [LIBRARY] [SAMPLES]
//! ```
//!
//! LIBRARY defaults to the system's `libnvidia-ml.so.1`; `tests/bench/gpu.sh` passes the fake
//! library on machines without a GPU. Prints the median, p99 and mean of SAMPLES samples
//! (default 1000) after one warm-up sample (which initialises NVML).

use std::path::Path;
use std::time::{Duration, Instant};

use aistack_exporter::collectors::gpu::attribution::{Attribution, IdentityCache};
use aistack_exporter::collectors::gpu::health::XidLog;
use aistack_exporter::collectors::gpu::nvml::NvmlSource;
use aistack_exporter::collectors::gpu::{GpuSource, attribute_reading};
use aistack_exporter::config::HostWorkloadConfig;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let library = args.next().unwrap_or_else(|| "libnvidia-ml.so.1".into());
    let samples: usize = args.next().map(|n| n.parse()).transpose()?.unwrap_or(1000);
    let procfs = Path::new("/proc");

    let mut source = NvmlSource::new(library.clone());
    // As the exporter runs it: with the XID event thread waiting alongside.
    source.watch_xids(std::sync::Arc::new(XidLog::default()));
    let attribution = Attribution::new(&[], &HostWorkloadConfig::default())?;
    let mut identities = IdentityCache::default();
    let first = source.read()?;
    let (devices, processes) = (
        first.devices.len(),
        first
            .devices
            .iter()
            .map(|d| d.processes.len())
            .sum::<usize>(),
    );
    attribute_reading(first, &attribution, &mut identities, procfs, &|_| None);

    let mut times: Vec<Duration> = (0..samples)
        .map(|_| {
            let started = Instant::now();
            let reading = source.read().expect("NVML went away during the benchmark");
            std::hint::black_box(attribute_reading(
                reading,
                &attribution,
                &mut identities,
                procfs,
                &|_| None,
            ));
            started.elapsed()
        })
        .collect();
    times.sort();
    let mean = times.iter().sum::<Duration>() / samples.max(1) as u32;
    let at = |q: f64| times[((samples as f64 * q) as usize).min(samples - 1)];
    println!("library {library}: {devices} GPU(s), {processes} process(es), {samples} samples");
    println!(
        "full sample: median {:.1} us, p99 {:.1} us, mean {:.1} us",
        at(0.5).as_secs_f64() * 1e6,
        at(0.99).as_secs_f64() * 1e6,
        mean.as_secs_f64() * 1e6
    );
    Ok(())
}
