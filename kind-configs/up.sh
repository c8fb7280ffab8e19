#!/usr/bin/env bash
# Three kind clusters (east, west, eu) joined into one Isthmus mesh:
# creates the clusters, builds and loads the image, gives each cluster its
# CA, installs Isthmus (deploy/), links every pair, deploys the sample
# with its sidecars, checks a cross-cluster call, and runs isthmus verify.
#
#   kind-configs/up.sh [--dry-run] [--clusters "east west eu"] [--image isthmus:dev] [--skip-build]
#
# --dry-run prints every command and runs none. Run twice, it reuses what
# exists (clusters, CAs, links) and re-applies the manifests.
# kind-configs/down.sh removes it all.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
STATE="$ROOT/.isthmus-kind"
DRY=0
BUILD=1
IMAGE=isthmus:dev
CLUSTERS="east west eu"

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --skip-build) BUILD=0 ;;
    --clusters) CLUSTERS="${2:?--clusters needs a list, e.g. \"east west\"}"; shift ;;
    --image) IMAGE="${2:?--image needs a name:tag}"; shift ;;
    -h | --help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "up.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
read -r -a NAMES <<<"$CLUSTERS"

say() { printf '\n== %s\n' "$*"; }
# Prints a command, and runs it unless --dry-run.
run() {
  printf '+ %s\n' "$*"
  if [ "$DRY" = 0 ]; then "$@"; fi
}
# Renders a kustomization, replaces placeholders, applies the result:
# apply_rendered CONTEXT DIR SED_SCRIPT
apply_rendered() {
  printf '+ kubectl kustomize %s | sed %q | kubectl --context %s apply --server-side --force-conflicts -f -\n' "$2" "$3" "$1"
  if [ "$DRY" = 0 ]; then
    kubectl kustomize "$2" | sed "$3" | kubectl --context "$1" apply --server-side --force-conflicts -f -
  fi
}
need() {
  if ! command -v "$1" >/dev/null 2>&1; then
    echo "up.sh: $1 is missing: $2" >&2
    exit 1
  fi
}
region_of() {
  case "$1" in
    east) echo us-east1 ;;
    west) echo us-west1 ;;
    eu) echo europe-west1 ;;
    *) sed -n 's/.*topology.kubernetes.io\/region: *"\{0,1\}\([a-z0-9-]*\).*/\1/p' "$ROOT/kind-configs/$1.yaml" | head -n 1 ;;
  esac
}

for c in "${NAMES[@]}"; do
  if [ ! -f "$ROOT/kind-configs/$c.yaml" ]; then
    echo "up.sh: no kind config for cluster $c: write kind-configs/$c.yaml (copy east.yaml; give it its own podSubnet, serviceSubnet and region)" >&2
    exit 2
  fi
done
if [ "$DRY" = 0 ]; then
  need docker "install Docker (https://docs.docker.com/engine/install/) and start it"
  need kind "install kind (https://kind.sigs.k8s.io/docs/user/quick-start/#installation)"
  need kubectl "install kubectl (https://kubernetes.io/docs/tasks/tools/)"
  need cargo "install Rust (https://rustup.rs): the isthmus CLI makes the CAs and the links"
  if ! docker info >/dev/null 2>&1; then
    echo "up.sh: Docker is installed but not running (or this user may not use it): start it, or add yourself to the docker group" >&2
    exit 1
  fi
fi

ISTHMUS="$ROOT/target/release/isthmus"
say "the isthmus CLI"
run cargo build --release --manifest-path "$ROOT/Cargo.toml" --bin isthmus

say "clusters"
for c in "${NAMES[@]}"; do
  if [ "$DRY" = 0 ] && kind get clusters 2>/dev/null | grep -qx "$c"; then
    echo "kind cluster $c exists: reusing it"
  else
    run kind create cluster --config "$ROOT/kind-configs/$c.yaml"
  fi
done

if [ "$BUILD" = 1 ]; then
  say "image $IMAGE"
  run docker build -t "$IMAGE" "$ROOT"
fi
for c in "${NAMES[@]}"; do
  run kind load docker-image "$IMAGE" --name "$c"
done

say "a CA per cluster (kept in $STATE)"
for c in "${NAMES[@]}"; do
  if [ -f "$STATE/$c/ca/ca-cert.pem" ]; then
    echo "$c: CA exists: reusing it"
  else
    run "$ISTHMUS" ca init --trust-domain "$c.local" --out "$STATE/$c/root"
    run "$ISTHMUS" ca cluster "$c" --ca "$STATE/$c/root" --out "$STATE/$c/ca"
  fi
done

say "install"
for c in "${NAMES[@]}"; do
  ctx="kind-$c"
  run kubectl --context "$ctx" apply --server-side -k "$ROOT/deploy/crds"
  run kubectl --context "$ctx" wait --for condition=established --timeout=60s \
    crd/serviceexports.multicluster.x-k8s.io crd/serviceimports.multicluster.x-k8s.io \
    crd/serviceentries.networking.istio.io
  for ns in isthmus-system sample; do
    printf '+ kubectl --context %s create namespace %s (if missing)\n' "$ctx" "$ns"
    if [ "$DRY" = 0 ]; then
      kubectl --context "$ctx" create namespace "$ns" --dry-run=client -o yaml | kubectl --context "$ctx" apply -f -
    fi
  done
  printf '+ kubectl --context %s -n isthmus-system create secret generic isthmus-ca --from-file=%s\n' "$ctx" "$STATE/$c/ca"
  printf '+ kubectl --context %s -n {isthmus-system,sample} create configmap isthmus-ca-root --from-file=root-cert.pem=%s\n' "$ctx" "$STATE/$c/ca/root-cert.pem"
  if [ "$DRY" = 0 ]; then
    kubectl --context "$ctx" -n isthmus-system create secret generic isthmus-ca \
      --from-file="$STATE/$c/ca" --dry-run=client -o yaml | kubectl --context "$ctx" apply -f -
    for ns in isthmus-system sample; do
      kubectl --context "$ctx" -n "$ns" create configmap isthmus-ca-root \
        --from-file=root-cert.pem="$STATE/$c/ca/root-cert.pem" --dry-run=client -o yaml |
        kubectl --context "$ctx" apply -f -
    done
  fi
  # Where the other clusters reach this one: its node on kind's network.
  node_ip="<address of $c-control-plane on kind's network>"
  if [ "$DRY" = 0 ]; then
    node_ip=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$c-control-plane")
  fi
  apply_rendered "$ctx" "$ROOT/deploy/overlays/$c" "s/ISTHMUS_NODE_IP/$node_ip/g"
  run kubectl --context "$ctx" -n isthmus-system rollout status deployment/isthmus-controller --timeout=180s
  run kubectl --context "$ctx" -n isthmus-system rollout status deployment/isthmus-gateway --timeout=180s
done

say "links (every pair)"
for ((i = 0; i < ${#NAMES[@]}; i++)); do
  for ((j = i + 1; j < ${#NAMES[@]}; j++)); do
    a=${NAMES[$i]}
    b=${NAMES[$j]}
    if [ -f "$STATE/linked-$a-$b" ]; then
      echo "$a and $b are linked already"
      continue
    fi
    printf '+ %s link create --context kind-%s  # prints a token\n' "$ISTHMUS" "$a"
    printf '+ %s link apply --context kind-%s <token>\n' "$ISTHMUS" "$b"
    if [ "$DRY" = 0 ]; then
      token=$("$ISTHMUS" link create --context "kind-$a")
      "$ISTHMUS" link apply --context "kind-$b" "$token"
      touch "$STATE/linked-$a-$b"
    fi
  done
done

say "the sample app, with its sidecars"
for c in "${NAMES[@]}"; do
  region=$(region_of "$c")
  apply_rendered "kind-$c" "$ROOT/deploy/sample" "s/CLUSTER/$c/g; s/REGION/$region/g"
  run kubectl --context "kind-$c" -n sample rollout status deployment/helloworld-v1 --timeout=180s
  run kubectl --context "kind-$c" -n sample rollout status deployment/sleep --timeout=180s
done

say "check"
first=${NAMES[0]}
for c in "${NAMES[@]}"; do
  run kubectl --context "kind-$c" get serviceentries -n sample
done
# helloworld answers naming its cluster; with every instance in the first
# cluster scaled to zero, the answer comes from another cluster.
url=http://helloworld.sample.svc.cluster.local:5000/hello
run kubectl --context "kind-$first" -n sample exec deploy/sleep -c app -- curl -sS -x 127.0.0.1:15001 "$url"
run kubectl --context "kind-$first" -n sample scale deployment/helloworld-v1 --replicas=0
run sleep 5
run kubectl --context "kind-$first" -n sample exec deploy/sleep -c app -- curl -sS -x 127.0.0.1:15001 "$url"
run kubectl --context "kind-$first" -n sample scale deployment/helloworld-v1 --replicas=1

say "isthmus verify"
# The admin APIs listen on each pod's loopback: forward them here.
forwards=()
verify_args=()
port=25000
# forward FLAG CONTEXT NAMESPACE TARGET REMOTE_PORT: forwards the next
# local port to it and adds `FLAG 127.0.0.1:PORT` to verify's arguments.
forward() {
  printf '+ kubectl --context %s -n %s port-forward %s %s:%s &\n' "$2" "$3" "$4" "$port" "$5"
  if [ "$DRY" = 0 ]; then
    kubectl --context "$2" -n "$3" port-forward "$4" "$port:$5" >/dev/null &
    forwards+=("$!")
  fi
  verify_args+=("$1" "127.0.0.1:$port")
  port=$((port + 1))
}
for c in "${NAMES[@]}"; do
  forward --controller "kind-$c" isthmus-system deploy/isthmus-controller 15000
  forward --gateway "kind-$c" isthmus-system deploy/isthmus-gateway 15000
done
forward --client "kind-$first" sample deploy/sleep 15001
if [ "$DRY" = 0 ]; then
  sleep 3
fi
status=0
run "$ISTHMUS" verify "${verify_args[@]}" || status=$?
for p in "${forwards[@]}"; do kill "$p" 2>/dev/null || true; done
if [ "$status" != 0 ]; then
  echo "up.sh: isthmus verify failed (above: what failed and what to check)" >&2
  exit "$status"
fi
say "done: ${NAMES[*]} are one mesh (kind-configs/down.sh removes them)"
