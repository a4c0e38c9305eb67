#!/usr/bin/env bash
# Checks the files in deploy/: the systemd unit (`systemd-analyze verify`,
# which must print nothing, and the hardening the unit promises), the
# Prometheus alert rules (`promtool check rules`) and their unit tests
# (`promtool test rules`). The metric names the rules and the dashboard use
# are checked against a live server by
# crates/kalandra-server/tests/deploy_metrics.rs.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/ensure-promtool.sh

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

unit=deploy/systemd/kalandra-server.service
# `verify` checks that ExecStart exists: point it at a stand-in executable.
printf '#!/bin/sh\n' > "$scratch/kalandra-server"
chmod +x "$scratch/kalandra-server"

verify_unit() { # prints systemd-analyze's complaints about unit file $1
    sed "s#^ExecStart=/usr/local/bin/kalandra-server#ExecStart=$scratch/kalandra-server#" "$1" \
        > "$scratch/kalandra-server.service"
    systemd-analyze verify "$scratch/kalandra-server.service" 2>&1 || echo "systemd-analyze failed"
}

# The checker must catch a bad directive, or it checks nothing.
sed 's/^NoNewPrivileges=yes/NoNewPrivilegs=yes/' "$unit" > "$scratch/broken.service"
if [ -z "$(verify_unit "$scratch/broken.service")" ]; then
    echo "check-deploy: systemd-analyze verify did not notice a misspelt directive" >&2
    exit 1
fi
complaints=$(verify_unit "$unit")
if [ -n "$complaints" ]; then
    echo "check-deploy: $unit:" >&2
    echo "$complaints" >&2
    exit 1
fi
for directive in DynamicUser=yes ProtectSystem=strict StateDirectory=kalandra NoNewPrivileges=yes \
    LimitNOFILE= ExecReload= CapabilityBoundingSet= ProtectHome=yes; do
    if ! grep -q "^$directive" "$unit"; then
        echo "check-deploy: $unit lacks $directive" >&2
        exit 1
    fi
done
echo "check-deploy: $unit verified"

promtool check rules deploy/prometheus/kalandra-alerts.yml
(cd deploy/prometheus && promtool test rules kalandra-alerts.test.yml)
echo "check-deploy: alert rules and their tests pass"
