#!/usr/bin/env bash
# Makes `promtool` available for the deploy/ checks (alert rules, their unit
# tests, `promtool check metrics`): installs Debian's `prometheus` package,
# which ships it, only when it is missing.
set -euo pipefail
if command -v promtool >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "promtool is missing and installing it needs root: apt-get install prometheus" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends prometheus
command -v promtool >/dev/null
