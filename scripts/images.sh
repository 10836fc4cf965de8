#!/usr/bin/env bash
# Builds Bouquet's two images, with nothing from a container registry:
#   bouquet-workloads:VERSION   workloads/Dockerfile (server and site pods; torch in a layer of its own)
#   bouquet-operator:VERSION    operator/Dockerfile  (the operator; no torch)
# 1. the base: a Debian bookworm with python3, made with debootstrap and `docker import`ed
#    as bouquet-base:bookworm (cached as a tarball);
# 2. Debian's dockerd, started here (no bridge, no iptables rules) unless a Docker daemon
#    answers already, and stopped again at the end;
# 3. the wheels of requirements.lock (cached per lock) and this checkout's own wheel, the
#    build context; the builds run with no network.
# With --containerd SOCKET it then loads the images into that containerd (namespace k8s.io,
# the kubelet's), where each carries the Docker image id it was loaded from as the label
# bouquet.dev/image-id: an image already there with the same id is not loaded again.
# The sources the images are built from are hashed; when neither they nor the images in
# that containerd changed, nothing is built or loaded and no daemon is started.
# Prints the two image names. Needs root (debootstrap, dockerd) and Debian's packages, which
# it installs when missing.
#
# Usage: scripts/images.sh [--containerd SOCKET]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${BOUQUET_CACHE:-$HOME/.cache/bouquet}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/pyproject.toml")
base=bouquet-base:bookworm
images=(workloads operator)
mkdir -p "$cache/images"
die() { echo "images.sh: $*" >&2; exit 1; }
say() { echo "$*" >&2; }
containerd=
if [[ ${1:-} == --containerd ]]; then
    containerd=${2:?--containerd needs the socket of a containerd}
fi
ctr_() { ctr --address "$containerd" --namespace k8s.io "$@"; }
context= dockerd_pid=
cleanup() {
    [[ -z $context ]] || rm -rf "$context"
    if [[ -n $dockerd_pid ]]; then
        kill "$dockerd_pid" 2>/dev/null || true
        while kill -0 "$dockerd_pid" 2>/dev/null; do sleep 0.2; done
    fi
}
trap cleanup EXIT

# What the images are made of: the lock, the Dockerfiles and the project's sources.
key=$(cd "$root" && find pyproject.toml requirements.lock operator workloads \
    -type f -not -path '*/__pycache__/*' -not -name '*.pyc' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)${BOUQUET_IMAGE_BASE:+-on-${BOUQUET_IMAGE_BASE//[^a-z0-9.]/-}}
# stamp IMAGE: the "key id" line of the last build of bouquet-IMAGE.
stamp() { cat "$cache/images/$1" 2>/dev/null || true; }
# loaded IMAGE: whether the containerd holds bouquet-IMAGE as last built.
loaded() {
    local id
    id=$(stamp "$1" | cut -d' ' -f2)
    [[ -n $id ]] && ctr_ images ls "name==docker.io/library/bouquet-$1:$version" | grep -qF "bouquet.dev/image-id=$id"
}
up_to_date=1
for image in "${images[@]}"; do
    [[ $(stamp "$image" | cut -d' ' -f1) == "$key" ]] || up_to_date=
    [[ -z $containerd ]] || loaded "$image" || up_to_date=
done
if [[ -n $up_to_date ]] && { [[ -n $containerd ]] || docker image inspect "bouquet-workloads:$version" >/dev/null 2>&1; }; then
    for image in "${images[@]}"; do echo "bouquet-$image:$version"; done
    exit 0
fi

"$root/scripts/debian-packages.sh" debootstrap:debootstrap dockerd:docker.io

# One build at a time on this machine. (The daemon started below must not inherit the lock.)
exec 9>"$cache/.images.lock"
flock 9

# --- the Docker daemon ---
docker_log=$cache/dockerd.log
if ! docker info >/dev/null 2>&1; then
    say "Starting dockerd (log: $docker_log)"
    # No bridge, no iptables rules, ip_forward left alone: builds run with --network none, and
    # nothing is left behind in the host's network configuration.
    setsid dockerd --bridge=none --iptables=false --ip6tables=false --ip-forward=false --pidfile /run/bouquet-dockerd.pid \
        </dev/null >"$docker_log" 2>&1 9>&- &
    dockerd_pid=$!
    # Stopped again when this script ends, however it ends.
    for _ in {1..150}; do
        docker info >/dev/null 2>&1 && break
        sleep 0.2
    done
    docker info >/dev/null 2>&1 || die "dockerd did not start; the end of $docker_log:"$'\n'"$(tail -n 20 "$docker_log")"
fi

# --- the base image ---
# Where a registry is at hand, BOUQUET_IMAGE_BASE names a base to pull instead (kind.sh
# passes python:3.11-slim-bookworm, the Dockerfiles' default).
if [[ -n ${BOUQUET_IMAGE_BASE:-} ]]; then
    base=$BOUQUET_IMAGE_BASE
elif ! docker image inspect "$base" >/dev/null 2>&1; then
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
mkdir -p "$context/project" "$context/operator"
"$venv/bin/pip" wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation -w "$context/project" "$root" >&2
# Hard links: the context is sent to dockerd whole, but not copied on disk first.
cp -al "$wheels" "$context/wheels" 2>/dev/null || cp -a "$wheels" "$context/wheels"
cp "$root/requirements.lock" "$context/"
cp "$root/operator/requirements.txt" "$context/operator/"

for image in "${images[@]}"; do
    name=bouquet-$image:$version
    # Built from these sources already (only loading was missing)?
    if [[ $(stamp "$image") != "$key $(docker image inspect -f '{{.Id}}' "$name" 2>/dev/null)" ]]; then
        say "Building $name"
        replaced=$(docker image inspect -f '{{.Id}}' "$name" 2>/dev/null || true)
        docker build --network none --build-arg "BASE=$base" -f "$root/$image/Dockerfile" -t "$name" "$context" >&2
        built=$(docker image inspect -f '{{.Id}}' "$name")
        echo "$key $built" >"$cache/images/$image"
        # The image this build replaces is left untagged: removed (with the layers no other
        # image has), or every rebuild would keep gigabytes more. The build stage's cached
        # layers stay, so that the next build reuses them.
        if [[ -n $replaced && $replaced != "$built" ]]; then
            docker rmi "$replaced" >/dev/null 2>&1 || true
        fi
    fi
    if [[ -n $containerd ]] && ! loaded "$image"; then
        say "Loading $name into containerd"
        docker save "$name" | ctr_ images import - >&2
        ctr_ images label "docker.io/library/$name" "bouquet.dev/image-id=$(stamp "$image" | cut -d' ' -f2)" >/dev/null
    fi
    echo "$name"
done
