#!/usr/bin/env bash
# Removes what kind-configs/up.sh made: the kind clusters and the CAs and
# link markers kept in .isthmus-kind.
#
#   kind-configs/down.sh [--dry-run] [--clusters "east west eu"]
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DRY=0
CLUSTERS="east west eu"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --clusters) CLUSTERS="${2:?--clusters needs a list, e.g. \"east west\"}"; shift ;;
    -h | --help) sed -n '2,5p' "$0"; exit 0 ;;
    *) echo "down.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
read -r -a NAMES <<<"$CLUSTERS"

run() {
  printf '+ %s\n' "$*"
  if [ "$DRY" = 0 ]; then "$@"; fi
}

if [ "$DRY" = 0 ] && ! command -v kind >/dev/null 2>&1; then
  echo "down.sh: kind is missing: install it (https://kind.sigs.k8s.io/docs/user/quick-start/#installation)" >&2
  exit 1
fi
for c in "${NAMES[@]}"; do
  if [ "$DRY" = 1 ] || kind get clusters 2>/dev/null | grep -qx "$c"; then
    run kind delete cluster --name "$c"
  else
    echo "no kind cluster $c"
  fi
done
run rm -rf "$ROOT/.isthmus-kind"
