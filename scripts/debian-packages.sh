#!/usr/bin/env bash
# Installs the Debian packages the tests use, when missing: Prometheus (a real server that
# scrapes the metrics endpoints; it brings promtool). Safe to run again: it installs only
# what is absent, and it keeps package scripts from starting the services as daemons.
set -euo pipefail
needed=()
command -v prometheus >/dev/null || needed+=(prometheus)
command -v promtool >/dev/null || needed+=(prometheus)
[[ ${#needed[@]} -eq 0 ]] && exit 0
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
