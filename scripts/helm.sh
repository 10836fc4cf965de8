#!/usr/bin/env bash
# Builds helm from its upstream Go module (no registry ships a helm binary these machines
# can fetch) and prints its path. A second call returns the cached binary at once.
#
# Usage: scripts/helm.sh   (prints the path of helm; progress goes to stderr)
# Cache: ${BOUQUET_CACHE:-~/.cache/bouquet}/helm-<version>/helm
set -euo pipefail

HELM_VERSION=v3.19.5
# The Kubernetes release helm assumes when no cluster is asked (helm template, helm lint):
# upstream's Makefile links in that of the client-go it builds with (0.34 for helm 3.19).
KUBE_MINOR=34

die() { echo "helm.sh: $*" >&2; exit 1; }
command -v go >/dev/null || die "Go is not installed (or not on PATH); building helm needs Go"

cache=${BOUQUET_CACHE:-$HOME/.cache/bouquet}/helm-$HELM_VERSION
mkdir -p "$cache"
exec 9>"$cache/.build.lock"
flock 9
key="$HELM_VERSION kubernetes=1.$KUBE_MINOR $(go env GOVERSION)"
if [[ -x $cache/helm && -f $cache/.complete && $(<"$cache/.complete") == "$key" ]]; then
    echo "$cache/helm"
    exit 0
fi
kube_flags=""
for package in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    kube_flags+=" -X $package.k8sVersionMajor=1 -X $package.k8sVersionMinor=$KUBE_MINOR"
done
echo "Building helm $HELM_VERSION into $cache (a few minutes the first time)" >&2
GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS="-trimpath -buildvcs=false" GOBIN="$cache" \
    go install -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION $kube_flags" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2 ||
    die "go install helm.sh/helm/v3/cmd/helm@$HELM_VERSION failed"
echo "$key" >"$cache/.complete"
echo "$cache/helm"
