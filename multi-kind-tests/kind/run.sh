#!/usr/bin/env bash
# Two real kind clusters joined by clustermesh, for machines with Docker and kind, set up
# with the CLI's Kubernetes mode only (no state directories, no hand-made Secrets, no helm):
# distinct pod and service CIDRs, images built and loaded, routes between the clusters'
# pod CIDRs on every node, then
#   clustermesh --context kind-clustermesh-N enable ... --service-type NodePort \
#       --values values-clusterN.yaml (cluster 1: 3 raft replicas, cluster 2: one) --set ...
#   clustermesh --context kind-clustermesh-1 --destination-context kind-clustermesh-2 connect
#   clustermesh --context kind-clustermesh-N status --wait
# the global echo service in both clusters, then:
#   - requests from cluster 1 land on cluster 1 (affinity local),
#   - cluster 1's echo scaled to zero -> answered by cluster 2,
#   - scaled back -> cluster 1 again,
#   - disconnect: cluster 1 no longer lists cluster 2, and with its own echo at zero
#     nothing answers any more (cluster 2's backends are gone from cluster 1).
# Usage: multi-kind-tests/kind/run.sh [up|test|down|all]   (default: all)
# Needs: docker (with a running daemon), kind, kubectl, and to build the CLI cargo and
# protoc; checked up front, one line per missing tool. See README.md.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CLI=${CLUSTERMESH_CLI:-$ROOT/target-kind/release/clustermesh}
NS=kube-system
NODEPORT=32379 # apiserver.service.nodePort in values-cluster*.yaml
TAG=${CLUSTERMESH_TAG:-dev}
WAIT=5m

say() { printf '\n== %s\n' "$*"; }
indent() { sed 's/^/    /'; }
die() { echo "error: $*" >&2; exit 1; }
# Checks every prerequisite of the step $1 (up or test) before doing anything, printing
# one line per missing one, and stops if any is missing.
preflight() {
  local missing=0
  miss() { echo "missing prerequisite: $*" >&2; missing=1; }
  command -v docker >/dev/null || miss "docker (https://docs.docker.com/engine/install/)"
  if command -v docker >/dev/null && ! docker info >/dev/null 2>&1; then
    miss "a running Docker daemon (\`docker info\` fails; start Docker or check your access to its socket)"
  fi
  command -v kind >/dev/null || miss "kind (https://kind.sigs.k8s.io/docs/user/quick-start/#installation)"
  command -v kubectl >/dev/null || miss "kubectl (https://kubernetes.io/docs/tasks/tools/)"
  if [ "$1" = up ] && [ -z "${CLUSTERMESH_CLI:-}" ]; then
    # The CLI is built on this machine; its protobuf definitions are compiled with protoc.
    command -v cargo >/dev/null || miss "cargo, to build the clustermesh CLI (https://rustup.rs; or set CLUSTERMESH_CLI to a built binary)"
    if [ -z "${PROTOC:-}" ] && ! command -v protoc >/dev/null; then
      miss "protoc, to build the clustermesh CLI (Debian/Ubuntu: apt-get install protobuf-compiler; or set PROTOC, or CLUSTERMESH_CLI to a built binary)"
    fi
  fi
  [ "$missing" = 0 ] || die "install the missing prerequisites above (see multi-kind-tests/kind/README.md)"
}
ctx() { echo "kind-clustermesh-$1"; }
k() { local c=$1; shift; kubectl --context "$(ctx "$c")" "$@"; }
cm() { local c=$1; shift; "$CLI" --context "$(ctx "$c")" --namespace "$NS" "$@"; }

build() {
  say "building images and the CLI"
  for target in apiserver agent; do
    docker build -f "$ROOT/deploy/docker/Dockerfile" --target "$target" -t "ghcr.io/clustermesh/clustermesh-$target:$TAG" "$ROOT"
  done
  docker build -f "$ROOT/deploy/docker/Dockerfile" --target netns -t "clustermesh-netns:$TAG" "$ROOT"
  if [ -z "${CLUSTERMESH_CLI:-}" ]; then
    CARGO_TARGET_DIR="$ROOT/target-kind" cargo build --release -p clustermesh-cli
  fi
}

# The cgroup v2 mount of cluster $1's nodes (the agent attaches its socket-level programs
# at its root). kind nodes on a cgroup v2 host mount the unified hierarchy at
# /sys/fs/cgroup (private cgroup namespace); on a hybrid v1/v2 host it is at
# /sys/fs/cgroup/unified. A pure cgroup v1 host cannot run the agent.
cgroup_root() {
  local node="clustermesh-$1-control-plane" dir
  for dir in /sys/fs/cgroup /sys/fs/cgroup/unified; do
    if [ "$(docker exec "$node" stat -fc %T "$dir" 2>/dev/null)" = cgroup2fs ]; then
      echo "$dir"
      return 0
    fi
  done
  die "the nodes of kind cluster $1 have no cgroup v2 mount; the agent needs a host with cgroup v2 (unified or hybrid)"
}

# Pod-to-pod routes between the clusters. kindnet routes the pod CIDRs of its own
# cluster's nodes only; the two clusters' node containers share the `kind` Docker network,
# so every node of cluster $1 gets a route to each node of cluster $2's pod CIDR via
# that node's InternalIP. `ip route replace` makes it idempotent (and restores the routes
# after the node containers restart).
route_pod_cidrs() {
  local from=$1 to=$2 node name cidr ip routes
  routes=$(k "$to" get nodes -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.spec.podCIDR}{" "}{.status.addresses[?(@.type=="InternalIP")].address}{"\n"}{end}')
  [ -n "$routes" ] || die "cluster $to has no nodes; is kind cluster clustermesh-$to up?"
  while read -r name cidr ip; do
    [ -n "$name" ] || continue
    if [ -z "$cidr" ] || [ -z "$ip" ]; then
      die "node $name of cluster $to has no podCIDR or InternalIP yet"
    fi
    for node in $(kind get nodes --name "clustermesh-$from"); do
      docker exec "$node" ip route replace "$cidr" via "$ip"
    done
    echo "    cluster $from -> $cidr via $ip ($name)"
  done <<<"$routes"
}

routes() {
  say "routes between the clusters' pod CIDRs"
  route_pod_cidrs 1 2
  route_pod_cidrs 2 1
}

# echo.yaml with its image following $TAG.
echo_manifest() {
  sed -E "s|image: clustermesh-netns:[^[:space:]]+|image: clustermesh-netns:$TAG|" "$HERE/echo.yaml"
}

up() {
  preflight up
  build
  for c in 1 2; do
    say "creating kind cluster $c"
    kind get clusters | grep -qx "clustermesh-$c" || kind create cluster --config "$HERE/cluster$c.yaml"
    for img in clustermesh-apiserver clustermesh-agent; do
      kind load docker-image --name "clustermesh-$c" "ghcr.io/clustermesh/$img:$TAG"
    done
    kind load docker-image --name "clustermesh-$c" "clustermesh-netns:$TAG"
  done
  routes
  for c in 1 2; do
    local root
    root=$(cgroup_root "$c")
    say "clustermesh enable cluster$c (mesh API on NodePort $NODEPORT, cgroup v2 at $root)"
    # Running it again upgrades in place (same CA, overrides kept).
    # values-cluster$c.yaml: cluster 1 runs 3 raft replicas, cluster 2 a single one
    # (cli/tests/it/kind_values.rs renders exactly these through the strict test API server
    # and real Helm).
    cm "$c" enable --cluster-name "cluster$c" --cluster-id "$c" --service-type NodePort \
      --values "$HERE/values-cluster$c.yaml" \
      --set image.tag="$TAG" --set agent.cgroupRoot="$root"
  done
  # Cluster 1's mesh API server is a StatefulSet (3 raft replicas), cluster 2's a Deployment.
  k 1 rollout status -n "$NS" statefulset/clustermesh-apiserver --timeout 300s
  k 2 rollout status -n "$NS" deploy/clustermesh-apiserver --timeout 180s
  for c in 1 2; do
    k "$c" rollout status -n "$NS" ds/clustermesh-agent --timeout 180s
  done
  connect
  for c in 1 2; do
    k "$c" create configmap echo-cluster --from-literal=name="cluster$c" --dry-run=client -o yaml | k "$c" apply -f -
    echo_manifest | k "$c" apply -f -
    k "$c" rollout status deploy/echo --timeout 120s
  done
  k 1 create deployment client --image "clustermesh-netns:$TAG" --dry-run=client -o yaml \
    -- /usr/bin/clustermesh-netns echo-server --listen 0.0.0.0:9 --identity client | k 1 apply -f -
  k 1 rollout status deploy/client --timeout 120s
}

# Connects the clusters (a refresh if they already are) and waits until every agent of
# both clusters is connected to both mesh API servers.
connect() {
  say "clustermesh connect cluster1 <-> cluster2"
  "$CLI" --context "$(ctx 1)" --destination-context "$(ctx 2)" --namespace "$NS" connect
  for c in 1 2; do
    say "clustermesh status cluster$c --wait"
    cm "$c" status --wait --wait-duration "$WAIT"
  done
}

# Answers of $1 requests from cluster 1's client to the echo service.
ask() {
  local vip; vip=$(k 1 get svc echo -o jsonpath='{.spec.clusterIP}')
  for _ in $(seq "$1"); do
    k 1 exec deploy/client -- /usr/bin/clustermesh-netns request --to "$vip:8080" --timeout-ms 2000 || echo FAILED
  done
}

expect_all() {
  local want=$1 n=$2 out
  out=$(ask "$n")
  indent <<<"$out"
  if echo "$out" | grep -qv "^$want/"; then die "expected every answer from $want"; fi
}

wait_for() {
  local want=$1
  for _ in $(seq 60); do
    ask 1 | grep -q "^$want" && return 0
    sleep 1
  done
  die "no answer matching $want within 60s"
}

test_() {
  preflight test
  [ -x "$CLI" ] || die "$CLI not found; run \`$0 up\` first (or set CLUSTERMESH_CLI)"
  routes
  connect
  say "requests from cluster 1 land on cluster 1 (affinity local)"
  expect_all cluster1 10
  say "scaling cluster 1's echo to zero: cluster 2 answers"
  k 1 scale deploy/echo --replicas 0
  wait_for cluster2/
  expect_all cluster2 10
  say "scaling back: cluster 1 again"
  k 1 scale deploy/echo --replicas 2
  k 1 rollout status deploy/echo --timeout 120s
  wait_for cluster1/
  expect_all cluster1 10

  say "clustermesh disconnect cluster1 <-> cluster2"
  "$CLI" --context "$(ctx 1)" --destination-context "$(ctx 2)" --namespace "$NS" disconnect
  for c in 1 2; do cm "$c" status --wait --wait-duration "$WAIT"; done
  say "after disconnect, cluster 1 with its echo at zero has no backend left"
  k 1 scale deploy/echo --replicas 0
  wait_for FAILED
  local out; out=$(ask 5)
  indent <<<"$out"
  if echo "$out" | grep -q '^cluster2/'; then die "cluster 2 still answers after disconnect"; fi
  k 1 scale deploy/echo --replicas 2
  k 1 rollout status deploy/echo --timeout 120s
  say "all checks passed (the clusters are disconnected; \`$0 test\` connects them again)"
}

down() {
  for c in 1 2; do kind delete cluster --name "clustermesh-$c" || true; done
}

case "${1:-all}" in
  up) up ;;
  test) test_ ;;
  down) command -v kind >/dev/null || die "kind is required (see multi-kind-tests/kind/README.md)"; down ;;
  all) preflight up; trap down EXIT; up; test_ ;;
  *) die "usage: $0 [up|test|down|all]" ;;
esac
