#!/usr/bin/env bash
# Installs Debian packages when the commands they provide are missing. Safe to run again: it
# installs only what is absent, and it keeps package scripts from starting the services as
# daemons (dockerd, prometheus: the scripts that need them start their own).
#
# Usage: scripts/debian-packages.sh [COMMAND:PACKAGE ...]
#   default: what the tests use, Prometheus (a real server that scrapes the metrics
#   endpoints; it brings promtool).
set -euo pipefail
(($#)) || set -- prometheus:prometheus promtool:prometheus
needed=()
for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null || PATH=$PATH:/usr/sbin:/sbin command -v "${pair%%:*}" >/dev/null || needed+=("${pair#*:}")
done
[[ ${#needed[@]} -eq 0 ]] && exit 0
mapfile -t needed < <(printf '%s\n' "${needed[@]}" | sort -u)
if [[ $(id -u) -ne 0 ]]; then
    echo "missing Debian packages: ${needed[*]}; install them (as root: apt-get install ${needed[*]})" >&2
    exit 1
fi
policy=/usr/sbin/policy-rc.d
made_policy=
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod +x "$policy"
    made_policy=1
fi
trap '[[ -n $made_policy ]] && rm -f "$policy"' EXIT
echo "Installing Debian packages: ${needed[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends "${needed[@]}" >&2
