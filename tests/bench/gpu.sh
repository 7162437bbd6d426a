#!/usr/bin/env bash
# Benchmark: the cost of one full GPU sample (every field and process of every GPU through
# NVML, plus attribution), and - where nvidia-smi exists - of the nvidia-smi call that
# nvidia_gpu_exporter forks on every scrape.
#
#   tests/bench/gpu.sh                 real NVML when libnvidia-ml.so.1 loads, else the fake
#   NVML=/path/libnvidia-ml.so.1 tests/bench/gpu.sh
#   SAMPLES=2000 SMI_RUNS=50 tests/bench/gpu.sh
#
# With the fake library (tests/fake-nvml, answering from a recorded H100) the figure is the
# exporter's own cost - FFI calls and attribution - without the driver's ioctls: a floor, not
# a hardware result.
set -euo pipefail
cd "$(dirname "$0")/../.."

SAMPLES=${SAMPLES:-1000}
SMI_RUNS=${SMI_RUNS:-30}
cargo build --release --locked -p aistack-exporter --example gpu_sample_cost >&2
cargo build --release --locked -p fake-nvml >&2
example=target/release/examples/gpu_sample_cost

library=${NVML:-}
if [[ -z $library ]]; then
  if "$example" libnvidia-ml.so.1 1 >/dev/null 2>&1; then
    library=libnvidia-ml.so.1
  else
    library=$PWD/target/release/libfake_nvml.so
    export FAKE_NVML_SCENARIO=$PWD/tests/fixtures/gpu/h100-80gb-hbm3.json
    echo "no NVIDIA driver here: using the fake NVML with a recorded H100" >&2
  fi
fi
"$example" "$library" "$SAMPLES"

if command -v nvidia-smi >/dev/null; then
  query=index,name,uuid,pci.bus_id,driver_version,utilization.gpu,memory.used,memory.total,temperature.gpu,power.draw,power.limit,clocks.gr,clocks.sm,clocks.mem,fan.speed,clocks_event_reasons.active
  python3 - "$SMI_RUNS" "$query" <<'PY'
import statistics, subprocess, sys, time
runs, query = int(sys.argv[1]), sys.argv[2]
times = []
for _ in range(runs):
    t = time.perf_counter()
    subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"], check=True, stdout=subprocess.DEVNULL)
    times.append(time.perf_counter() - t)
times.sort()
print(f"nvidia-smi --query-gpu (what nvidia_gpu_exporter forks per scrape), {runs} runs: "
      f"median {statistics.median(times) * 1e3:.1f} ms, p99 {times[min(len(times) - 1, int(len(times) * 0.99))] * 1e3:.1f} ms")
PY
else
  echo "nvidia-smi not found: no comparison on this machine" >&2
fi
