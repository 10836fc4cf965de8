#!/usr/bin/env bash
# Prints the path of Bouquet's virtual environment, building it first if needed.
# The environment is keyed by the hash of requirements.lock and kept under
# $BOUQUET_CACHE (default ~/.cache/bouquet), so every checkout on this machine shares it
# and a second call returns at once. The project itself is not installed into it: the
# Makefile puts operator/ and workloads/ on PYTHONPATH, so checkouts never fight over it.
# Environments of other lock files that no checkout has used for two weeks are removed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${BOUQUET_CACHE:-$HOME/.cache/bouquet}
hash=$(sha256sum "$root/requirements.lock" | cut -c1-16)
venv=$cache/venv-$hash
mkdir -p "$cache"
exec 9>"$cache/.venv.lock"
flock 9
if [[ ! -f $venv/.complete ]]; then
    python=${BOUQUET_PYTHON:-python3}
    if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
        echo "Bouquet needs Python 3.11; '$python' is not. Set BOUQUET_PYTHON to a Python 3.11." >&2
        exit 1
    fi
    echo "Building the Python environment in $venv (torch is large: minutes the first time)" >&2
    rm -rf "$venv"
    "$python" -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$root/requirements.lock" >&2
    touch "$venv/.complete"
fi
# Each use marks the environment as used; those of other lock files unused for two weeks
# (several GB each) are removed.
touch "$venv/.complete"
for old in "$cache"/venv-*; do
    if [[ $old != "$venv" && -f $old/.complete && -n $(find "$old/.complete" -mtime +14) ]]; then
        rm -rf "$old"
    fi
done
echo "$venv"
