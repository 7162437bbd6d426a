#!/usr/bin/env bash
# Benchmark: both binaries under load at once, at rising levels. At each level, wrk scrapes
# aistack-exporter's /metrics (closed loop, C connections) while webhook_load posts webhooks to
# aistack-actioner at R per second (open loop, every action in dry-run); then the same wrk
# level runs against node_exporter, with the webhook load on, as the reference. Reports
# throughput, p50/p99 and peak RSS of each.
#
#   tests/bench/load.sh            print the figures
#   tests/bench/load.sh --write    also replace the "load benchmark" section of docs/performance.md
#
# Env: DURATION (seconds per level, default 10), LEVELS ("connections:webhooks/s ...",
# default "4:250 16:1000 64:4000").
# Needs: wrk, prometheus-node-exporter (./tests/run installs both), a Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION=${DURATION:-10}
LEVELS=${LEVELS:-"4:250 16:1000 64:4000"}
WRITE=${1:-}

cargo build --release --locked -p aistack-exporter -p aistack-actioner >&2
cargo build --release --locked -p aistack-actioner --example webhook_load >&2
NODE=$(command -v prometheus-node-exporter || command -v node_exporter)

dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
hwm_mib() { awk '/^VmHWM:/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
wait_up() { for _ in $(seq 100); do curl -fs -o /dev/null "$1" && return 0; sleep 0.1; done; echo "no answer from $1" >&2; exit 1; }

e_port=$(free_port)
target/release/aistack-exporter --web.listen-address "127.0.0.1:$e_port" --log.level warn &
e_pid=$!; pids+=("$e_pid")
n_port=$(free_port)
"$NODE" --web.listen-address "127.0.0.1:$n_port" --log.level=warn 2>/dev/null &
n_pid=$!; pids+=("$n_pid")
echo "0123456789abcdef" >"$dir/token"
chmod 0600 "$dir/token"   # the actioner refuses secret files others can read
cat >"$dir/actioner.yaml" <<YAML
host: gpu-box
state_dir: $dir/state
dry_run: true
auth: {bearer_token_file: $dir/token}
rules:
  - {name: phone, match_re: {severity: "critical|warning"}, on: both, action: notify}
actions:
  notify: {ntfy: {url: "http://127.0.0.1:9", topic: bench}}
YAML
a_port=$(free_port)
target/release/aistack-actioner --config.file "$dir/actioner.yaml" --web.listen-address "127.0.0.1:$a_port" --log.level error &
a_pid=$!; pids+=("$a_pid")
wait_up "http://127.0.0.1:$e_port/metrics"
wait_up "http://127.0.0.1:$n_port/metrics"
wait_up "http://127.0.0.1:$a_port/healthz"

scrape() { # url connections -> "req/s p50 p99"
  wrk -t2 -c"$2" -d"${DURATION}s" --latency "$1" | awk '
    function ms(v) { if (v ~ /us$/) {sub(/us$/, "", v); return v / 1000} if (v ~ /ms$/) {sub(/ms$/, "", v); return v} sub(/s$/, "", v); return v * 1000 }
    /Requests\/sec:/ {rps = $2}
    $1 == "50%" {p50 = ms($2)}
    $1 == "99%" {p99 = ms($2)}
    END {printf "%.0f %.2f %.2f\n", rps, p50, p99}'
}
webhooks() { # rate -> "achieved/s p50 p99 non-200"
  target/release/examples/webhook_load "http://127.0.0.1:$a_port/api/v1/alerts" 0123456789abcdef "$1" "$DURATION" |
    awk '{
      for (i = 1; i <= NF; i++) {
        if ($i == "p50") p50 = $(i + 1); if ($i == "p99") p99 = $(i + 1)
        if ($i ~ /^\(/ && $i ~ /\/s\),?$/) { a = $i; gsub(/[(),\/s]/, "", a) }
        if ($i == "sent") sent = $(i + 1); if ($i == "200:") ok = $(i + 1)
      }
      gsub(/,/, "", sent); gsub(/,/, "", ok)
      printf "%s %s %s %d\n", a, p50, p99, sent - ok
    }'
}

rows=()
for level in $LEVELS; do
  c=${level%%:*}; r=${level##*:}
  echo "level: $c connections on /metrics, $r webhooks/s, ${DURATION}s..." >&2
  webhooks "$r" >"$dir/w" & w_pid=$!
  read -r e_rps e_p50 e_p99 < <(scrape "http://127.0.0.1:$e_port/metrics" "$c")
  wait "$w_pid"; read -r w_rate w_p50 w_p99 w_bad <"$dir/w"
  webhooks "$r" >/dev/null & w_pid=$!
  read -r n_rps n_p50 n_p99 < <(scrape "http://127.0.0.1:$n_port/metrics" "$c")
  wait "$w_pid"
  rows+=("| $c conns, $r webhooks/s | $e_rps req/s, p50 $e_p50 ms, p99 $e_p99 ms | $w_rate/s, p50 $w_p50 ms, p99 $w_p99 ms, non-200 $w_bad | $n_rps req/s, p50 $n_p50 ms, p99 $n_p99 ms |")
done

node_version=$("$NODE" --version 2>&1 | head -1 | awk '{print $3}')
report=$(cat <<MD
Measured $(date -u +%Y-%m-%d) on $(nproc) CPUs ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)),
kernel $(uname -r), with \`tests/bench/load.sh\` (DURATION=$DURATION, LEVELS="$LEVELS"): release builds
of aistack $(git describe --always --dirty 2>/dev/null || echo unknown), node_exporter $node_version (Debian
package); all on loopback and on the same CPUs as the load generators, so each number is lower than
on an idle host. At each level the exporter and the actioner are loaded together; node_exporter
then gets the same wrk level with the webhook load running.

| level | aistack-exporter /metrics | aistack-actioner webhooks (dry-run, fsync) | node_exporter /metrics |
|---|---|---|---|
$(printf '%s\n' "${rows[@]}")

Peak RSS over the run (VmHWM): aistack-exporter $(hwm_mib "$e_pid") MiB, aistack-actioner
$(hwm_mib "$a_pid") MiB, node_exporter $(hwm_mib "$n_pid") MiB.
MD
)
echo "$report"

if [[ $WRITE == --write ]]; then
  python3 - docs/performance.md "$report" <<'PY'
import re, sys
path, report = sys.argv[1], sys.argv[2]
text = open(path).read()
begin, end = "<!-- load-benchmark:begin -->", "<!-- load-benchmark:end -->"
if begin not in text:
    text += f"\n## Both binaries under load together\n\n{begin}\n{end}\n"
text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: f"{begin}\n{report}\n{end}", text, flags=re.S)
open(path, "w").write(text)
PY
  echo "wrote docs/performance.md" >&2
fi
