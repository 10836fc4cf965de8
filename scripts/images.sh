#!/usr/bin/env bash
# Builds Bouquet's two images, with nothing from a container registry:
#   bouquet-workloads:VERSION   workloads/Dockerfile (server and site pods; torch in a layer of its own)
#   bouquet-operator:VERSION    operator/Dockerfile  (the operator; no torch)
# 1. the base: a Debian bookworm with python3, made with debootstrap and `docker import`ed
#    as bouquet-base:bookworm (cached as a tarball);
# 2. Debian's dockerd, started here (no bridge, no iptables rules) unless a Docker daemon
#    answers already;
# 3. the wheels of requirements.lock (cached per lock) and this checkout's own wheel, the
#    build context; the builds run with no network.
# Prints the two image names. Needs root (debootstrap, dockerd) and Debian's packages, which
# it installs when missing.
#
# Usage: scripts/images.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${BOUQUET_CACHE:-$HOME/.cache/bouquet}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/pyproject.toml")
base=bouquet-base:bookworm
mkdir -p "$cache"
die() { echo "images.sh: $*" >&2; exit 1; }
say() { echo "$*" >&2; }

"$root/scripts/debian-packages.sh" debootstrap:debootstrap dockerd:docker.io

# One build at a time on this machine. (The daemon started below must not inherit the lock.)
exec 9>"$cache/.images.lock"
flock 9

# --- the Docker daemon ---
docker_log=$cache/dockerd.log
if ! docker info >/dev/null 2>&1; then
    say "Starting dockerd (log: $docker_log)"
    # No bridge and no iptables rules: builds run with --network none, and nothing is left
    # behind in the host's network configuration.
    setsid dockerd --bridge=none --iptables=false --ip6tables=false --pidfile /run/bouquet-dockerd.pid \
        </dev/null >"$docker_log" 2>&1 9>&- &
    for _ in {1..150}; do
        docker info >/dev/null 2>&1 && break
        sleep 0.2
    done
    docker info >/dev/null 2>&1 || die "dockerd did not start; the end of $docker_log:"$'\n'"$(tail -n 20 "$docker_log")"
fi

# --- the base image ---
if ! docker image inspect "$base" >/dev/null 2>&1; then
    tarball=$cache/base-bookworm.tar
    if [[ ! -f $tarball ]]; then
        rootfs=$(mktemp -d)
        say "Making a bookworm root filesystem with python3 (about a minute)"
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" http://deb.debian.org/debian >&2 ||
            die "debootstrap failed"
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        tar -C "$rootfs" -cf "$tarball.partial" .
        mv "$tarball.partial" "$tarball"
        rm -rf "$rootfs"
    fi
    docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' --change 'CMD ["python3"]' \
        "$tarball" "$base" >&2
fi

# --- the wheels ---
venv=$("$root/scripts/venv.sh")
wheels=$cache/wheels-$(sha256sum "$root/requirements.lock" | cut -c1-16)
if [[ ! -f $wheels/.complete ]]; then
    say "Collecting the wheels of requirements.lock in $wheels (several GB the first time: torch and CUDA)"
    mkdir -p "$wheels"
    "$venv/bin/pip" wheel --quiet --disable-pip-version-check --no-deps -r "$root/requirements.lock" -w "$wheels" >&2
    touch "$wheels/.complete"
fi

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
mkdir -p "$context/project" "$context/operator"
"$venv/bin/pip" wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation -w "$context/project" "$root" >&2
# Hard links: the context is sent to dockerd whole, but not copied on disk first.
cp -al "$wheels" "$context/wheels" 2>/dev/null || cp -a "$wheels" "$context/wheels"
cp "$root/requirements.lock" "$context/"
cp "$root/operator/requirements.txt" "$context/operator/"

for image in workloads operator; do
    say "Building bouquet-$image:$version"
    docker build --network none --build-arg "BASE=$base" -f "$root/$image/Dockerfile" -t "bouquet-$image:$version" "$context" >&2
    echo "bouquet-$image:$version"
done
