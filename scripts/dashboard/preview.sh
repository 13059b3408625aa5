#!/usr/bin/env bash
# Renders docs/dashboard.png: a preview of config/grafana/optout-sync.json's panels drawn from
# real metrics of a demo run. Not Grafana: the dashboard's own PromQL queries are evaluated by
# a local Prometheus and drawn with uPlot in headless Chromium.
#
#   scripts/dashboard/preview.sh            # load run (LOAD_SECONDS, default 360), then render
#   scripts/dashboard/preview.sh --render   # render again from the last run's Prometheus data
#
# Needs: cargo, prometheus (Debian: prometheus), chromium (Debian: chromium), node + npm.
# The fakes of every system run on 127.0.0.1; nothing leaves the machine.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
work="${PREVIEW_DIR:-${TMPDIR:-/tmp}/optout-sync-dashboard-preview}"
listen="127.0.0.1:${PREVIEW_DAEMON_PORT:-18088}"
prom_port="${PREVIEW_PROM_PORT:-19090}"
seconds="${LOAD_SECONDS:-360}"
render_only=false
[[ "${1:-}" == "--render" ]] && render_only=true

mkdir -p "$work"
cat >"$work/prometheus.yml" <<YML
global:
  scrape_interval: 5s
  evaluation_interval: 5s
scrape_configs:
  - job_name: optout-sync
    static_configs:
      - targets: ["$listen"]
YML

if ! $render_only; then
    rm -rf "$work/tsdb"
fi
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
    --web.listen-address="127.0.0.1:$prom_port" >"$work/prometheus.log" 2>&1 &
prom_pid=$!
trap 'kill "$prom_pid" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    curl -fsS "http://127.0.0.1:$prom_port/-/ready" >/dev/null 2>&1 && break
    sleep 0.2
done

if ! $render_only; then
    (cd "$repo" && cargo build --quiet --bin optout-sync --example dashboard-load)
    target="${CARGO_TARGET_DIR:-$repo/target}"
    "$target/debug/examples/dashboard-load" "$target/debug/optout-sync" "$listen" "$seconds"
    # One more scrape after the last webhooks' pushes are done.
    sleep 6
fi

(cd "$here" && npm ci --no-audit --no-fund --silent)
node "$here/render.mjs" "http://127.0.0.1:$prom_port" "$repo/config/grafana/optout-sync.json" \
    "$work/preview.html" | tee "$work/render.log"
height="$(sed -n 's/^height=//p' "$work/render.log")"
profile="$(mktemp -d)"
chromium --headless --no-sandbox --disable-gpu --disable-background-networking \
    --disable-component-update --disable-sync --no-first-run --user-data-dir="$profile" \
    --hide-scrollbars --window-size=1600,"$height" --virtual-time-budget=5000 \
    --screenshot="$repo/docs/dashboard.png" "file://$work/preview.html"
rm -rf "$profile"
echo "wrote docs/dashboard.png"
