#!/usr/bin/env bash
# Installs (or upgrades) Bouquet's Helm chart into the cluster that up.sh started in
# STATE_DIR, as `helm install` per cluster would, with the helm that scripts/helm.sh builds:
# release `bouquet` in namespace bouquet-system, the images that node.sh loaded, sites allowed
# to read node folders under /srv/bouquet (as the README's install does).
#
# Usage: scripts/cluster/install.sh [STATE_DIR]   (default: $BOUQUET_CLUSTER_DIR, else /tmp/bouquet-cluster)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
source "$here/common.sh"
state=$(state_dir "${1:-}")
[[ -f $state/kubeconfig ]] || die "no cluster in $state: start one with scripts/cluster/up.sh --node"
"$state/bin/helm" --kubeconfig "$state/kubeconfig" upgrade --install bouquet "$here/../../charts/bouquet" \
    --namespace bouquet-system --create-namespace --wait --timeout 5m \
    --set-json 'admission.allowedHostPaths=["/srv/bouquet"]' >&2
echo "Bouquet's chart is installed (release bouquet, namespace bouquet-system). For this cluster, with its kubectl and helm:" >&2
echo "export PATH=$state/bin:\$PATH"
echo "export KUBECONFIG=$state/kubeconfig"
