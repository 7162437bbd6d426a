#!/usr/bin/env bash
# Benchmark: the actioner's webhook answer under load, with every action in dry-run, and its
# memory under a flood of distinct alerts. Open-loop (requests on a fixed schedule), on
# loopback, with the journal on this machine's disk (fsync per batch).
#
#   tests/bench/webhook.sh            print the figures
#   tests/bench/webhook.sh --write    also replace the "webhook benchmark" section of docs/performance.md
set -euo pipefail
cd "$(dirname "$0")/../.."
WRITE=${1:-}

cargo build --release --locked -p aistack-actioner --example webhook_load >&2
cargo build --release --locked -p aistack-actioner >&2
load=target/release/examples/webhook_load

dir=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
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
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
target/release/aistack-actioner --config.file "$dir/actioner.yaml" --web.listen-address "127.0.0.1:$port" --log.level error &
pid=$!
for _ in $(seq 50); do curl -fs -o /dev/null "127.0.0.1:$port/healthz" && break; sleep 0.1; done
url="http://127.0.0.1:$port/api/v1/alerts"
rss() { awk -v k="$1" '$1 == k":" {printf "%.1f MiB", $2 / 1024}' "/proc/$pid/status"; }

echo "RSS at start: $(rss VmRSS)" >&2
lines=()
lines+=("$("$load" "$url" 0123456789abcdef 1000 10)")
for rate in 2000 5000 8000; do
  lines+=("$("$load" "$url" 0123456789abcdef "$rate" 5)")
done
entries=$(cat "$dir"/state/journal*.jsonl | wc -l)
report=$(cat <<MD
Measured $(date -u +%Y-%m-%d) on $(nproc) CPUs ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)),
release build, every action in dry-run (each webhook: one alert, one rule, journaled as received
and planned, then the executor's dry-run entry), journal on local disk with fsync per batch,
open-loop load from \`actioner/examples/webhook_load.rs\` (2 threads) on the same machine.

\`\`\`
$(printf '%s\n' "${lines[@]}")
\`\`\`

- Distinct alerts sent: $(( 1000 * 10 + (2000 + 5000 + 8000) * 5 )); journal lines written: $entries.
- Actioner RSS after the flood: $(rss VmRSS) (peak $(rss VmHWM)); dedupe state is a 64-bit hash per
  firing (8 bytes of key data, about 16 bytes with the hash set and the queue that hold it),
  capped at 200 000 firings, and the journal rotates at 16 MiB (4 files kept).
MD
)
echo "$report"
if [[ $WRITE == --write ]]; then
  python3 - docs/performance.md "$report" <<'PY'
import re, sys
path, report = sys.argv[1], sys.argv[2]
text = open(path).read()
begin, end = "<!-- webhook-benchmark:begin -->", "<!-- webhook-benchmark:end -->"
text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: f"{begin}\n{report}\n{end}", text, flags=re.S)
open(path, "w").write(text)
PY
  echo "wrote docs/performance.md" >&2
fi
