#!/usr/bin/env bash
# Benchmark: /metrics of aistack-exporter against node_exporter, in the same run, on loopback.
#
#   tests/bench/scrape.sh            print the figures
#   tests/bench/scrape.sh --write    also replace the "scrape benchmark" section of docs/performance.md
#
# Env: DURATION (wrk seconds per exporter, default 20), IDLE (seconds to measure background
# sampling cost, default 60), THREADS/CONNECTIONS (wrk, default 2/32).
# Needs: wrk, prometheus-node-exporter (./tests/run installs both), a Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION=${DURATION:-20}
IDLE=${IDLE:-60}
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-32}
WRITE=${1:-}

cargo build --release --locked -p aistack-exporter >&2
AISTACK=target/release/aistack-exporter
NODE=$(command -v prometheus-node-exporter || command -v node_exporter)
TCK=$(getconf CLK_TCK)

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
wait_up() { for _ in $(seq 100); do curl -fs -o /dev/null "$1" && return 0; sleep 0.1; done; echo "no answer from $1" >&2; exit 1; }

a_port=$(free_port)
"$AISTACK" --web.listen-address "127.0.0.1:$a_port" --log.level warn &
a_pid=$!; pids+=("$a_pid")
n_port=$(free_port)
"$NODE" --web.listen-address "127.0.0.1:$n_port" --log.level=warn 2>/dev/null &
n_pid=$!; pids+=("$n_pid")
wait_up "http://127.0.0.1:$a_port/metrics"
wait_up "http://127.0.0.1:$n_port/metrics"

echo "measuring background sampling cost over ${IDLE}s (no scrapes)..." >&2
sleep 2
t0=$(cpu_ticks "$a_pid"); sleep "$IDLE"; t1=$(cpu_ticks "$a_pid")
idle_pct=$(awk -v d=$((t1 - t0)) -v tck="$TCK" -v s="$IDLE" 'BEGIN {printf "%.2f", d / tck / s * 100}')
idle_rss=$(rss_kib "$a_pid")

# What Prometheus sends when it scrapes: OpenMetrics preferred, gzip.
PROM_ACCEPT='application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2'
load() { # url [wrk header args] -> "req/s p99"
  local url=$1; shift
  wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency "$@" "$url" | awk '
    /Requests\/sec:/ {rps = $2}
    $1 == "99%" {v = $2; if (v ~ /us$/) {sub(/us$/, "", v); v /= 1000} else if (v ~ /ms$/) {sub(/ms$/, "", v)} else if (v ~ /s$/) {sub(/s$/, "", v); v *= 1000}; p99 = v}
    END {printf "%.0f %.2f\n", rps, p99}'
}
echo "loading aistack-exporter for ${DURATION}s, as curl asks (classic text, no gzip)..." >&2
read -r a_rps a_p99 < <(load "http://127.0.0.1:$a_port/metrics")
echo "loading node_exporter for ${DURATION}s, as curl asks..." >&2
read -r n_rps n_p99 < <(load "http://127.0.0.1:$n_port/metrics")
prom=(-H "Accept: $PROM_ACCEPT" -H "Accept-Encoding: gzip")
echo "loading aistack-exporter for ${DURATION}s, as Prometheus asks (OpenMetrics, gzip)..." >&2
read -r ag_rps ag_p99 < <(load "http://127.0.0.1:$a_port/metrics" "${prom[@]}")
echo "loading node_exporter for ${DURATION}s, as Prometheus asks..." >&2
read -r ng_rps ng_p99 < <(load "http://127.0.0.1:$n_port/metrics" "${prom[@]}")

a_bytes=$(curl -fs "http://127.0.0.1:$a_port/metrics" | wc -c)
n_bytes=$(curl -fs "http://127.0.0.1:$n_port/metrics" | wc -c)
gz_bytes() { curl -fs -H "Accept: $PROM_ACCEPT" -H "Accept-Encoding: gzip" "$1" | wc -c; }
ag_bytes=$(gz_bytes "http://127.0.0.1:$a_port/metrics")
ng_bytes=$(gz_bytes "http://127.0.0.1:$n_port/metrics")
a_hwm=$(hwm_kib "$a_pid"); n_hwm=$(hwm_kib "$n_pid")
node_version=$("$NODE" --version 2>&1 | head -1 | awk '{print $3}')
ratio_rps=$(awk -v a="$a_rps" -v n="$n_rps" 'BEGIN {printf "%.0f", a / n}')
ratio_p99=$(awk -v a="$a_p99" -v n="$n_p99" 'BEGIN {printf "%.0f", n / a}')
ratio_grps=$(awk -v a="$ag_rps" -v n="$ng_rps" 'BEGIN {printf "%.0f", a / n}')

report=$(cat <<MD
Measured $(date -u +%Y-%m-%d) on $(nproc) CPUs ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)),
kernel $(uname -r); wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s against each exporter in turn, same run,
first as curl asks (no Accept, no gzip), then with Prometheus's Accept and Accept-Encoding: gzip,
loopback; aistack-exporter $(git describe --always --dirty 2>/dev/null || echo unknown) (release build,
default collectors), node_exporter $node_version (Debian package, default collectors).

| | aistack-exporter | node_exporter | target |
|---|---:|---:|---|
| requests/s | $a_rps | $n_rps | aistack >= 20x node_exporter: **${ratio_rps}x** |
| p99 latency | ${a_p99} ms | ${n_p99} ms | aistack <= 1/20 of node_exporter: **1/${ratio_p99}** |
| peak RSS (VmHWM, after load) | $((a_hwm / 1024)).$(( (a_hwm % 1024) * 10 / 1024 )) MiB | $((n_hwm / 1024)).$(( (n_hwm % 1024) * 10 / 1024 )) MiB | aistack < 12 MiB |
| requests/s as Prometheus asks (OpenMetrics, gzip) | $ag_rps | $ng_rps | **${ratio_grps}x** |
| p99 latency as Prometheus asks | ${ag_p99} ms | ${ng_p99} ms | |
| /metrics size (classic text; gzipped as Prometheus asks) | $a_bytes B; $ag_bytes B | $n_bytes B; $ng_bytes B | |
| background sampling CPU, no scrapes, ${IDLE}s | ${idle_pct} % of one core | (samples on scrape) | < 0.5 % |
| RSS while idle | $((idle_rss / 1024)).$(( (idle_rss % 1024) * 10 / 1024 )) MiB | | |
MD
)
echo "$report"

if [[ $WRITE == --write ]]; then
  doc=docs/performance.md
  python3 - "$doc" "$report" <<'PY'
import sys, re
path, report = sys.argv[1], sys.argv[2]
text = open(path).read()
begin, end = "<!-- scrape-benchmark:begin -->", "<!-- scrape-benchmark:end -->"
new = f"{begin}\n{report}\n{end}"
text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: new, text, flags=re.S)
open(path, "w").write(text)
PY
  echo "wrote $doc" >&2
fi
