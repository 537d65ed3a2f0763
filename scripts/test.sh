#!/usr/bin/env bash
# Runs every check of the project: formatting, lints, Rust tests, the official SDK peers against sblocal,
# and the deployment artifacts (manifests, scripts, Dockerfile, compose).
#
# On a fresh machine it installs what it needs first (Debian packages when run as root, a Python venv in
# .venv, npm packages under tests/peers/node). Every step runs even when an earlier one failed; the last
# line sums the test counts, and the exit code is non-zero when anything failed.
#
#   scripts/test.sh            everything
#   SKIP_SETUP=1 scripts/test.sh   assume the tools are already installed
set -uo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root" || exit 1
log_dir=$(mktemp -d)
trap 'rm -rf "$log_dir"' EXIT

venv="$repo_root/.venv"
failed_steps=()
passed=0
failed=0
skipped=0

note() { printf '\n==> %s\n' "$*"; }

setup_debian_packages() {
  local missing=()
  command -v shellcheck >/dev/null || missing+=(shellcheck)
  command -v docker-compose >/dev/null || missing+=(docker-compose)
  command -v promtool >/dev/null || missing+=(prometheus)
  command -v curl >/dev/null || missing+=(curl)
  command -v openssl >/dev/null || missing+=(openssl)
  command -v npm >/dev/null || missing+=(npm)
  python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing Debian packages: ${missing[*]} (run as root, or install them)" >&2
    return 1
  fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

setup_python() {
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv" || return 1
  "$venv/bin/pip" install -q --disable-pip-version-check \
    -r tests/peers/python/requirements.txt -r tests/peers/tools-requirements.txt
}

setup_node() {
  [ -f tests/peers/node/package.json ] || return 0
  (cd tests/peers/node && if [ -f package-lock.json ]; then npm ci --no-audit --no-fund; else npm install --no-audit --no-fund; fi)
}

# Runs one step, keeping its output, and adds the test counts it printed to the totals.
step() {
  local name=$1
  shift
  note "$name"
  local out
  out="$log_dir/$(echo "$name" | tr -c 'a-zA-Z0-9' '_').log"
  "$@" 2>&1 | tee "$out"
  local status=${PIPESTATUS[0]}
  count_results "$out"
  if [ "$status" -ne 0 ]; then
    failed_steps+=("$name")
    echo "step failed: $name (exit $status)"
  fi
}

# Sums the summaries of cargo test, pytest, node's test runner and check-deploy.sh.
count_results() {
  local file=$1 p f s
  read -r p f s < <(awk '
    function add(word, n) { if (word ~ /^passed/) p += n; else if (word ~ /^(failed|errors?)/) f += n; else if (word ~ /^(skipped|ignored)/) s += n }
    /^test result:/ { for (i = 1; i < NF; i++) if ($i ~ /^[0-9]+$/) add($(i+1), $i) }
    /^(=+ )?[0-9]+ (passed|failed|errors?|skipped)(,.*)? in [0-9.]+s/ { for (i = 1; i < NF; i++) if ($i ~ /^[0-9]+$/) add($(i+1), $i) }
    /^checks: [0-9]+ passed, [0-9]+ failed/ { for (i = 2; i < NF; i++) if ($i ~ /^[0-9]+$/) add($(i+1), $i) }
    /^ℹ (pass|fail|skipped) [0-9]+$/ { add($2 == "pass" ? "passed" : $2 == "fail" ? "failed" : "skipped", $3) }
    END { print p + 0, f + 0, s + 0 }' "$file")
  passed=$((passed + p))
  failed=$((failed + f))
  skipped=$((skipped + s))
}

if [ -z "${SKIP_SETUP:-}" ]; then
  note "setup"
  setup_debian_packages || failed_steps+=("setup: Debian packages")
  setup_python || failed_steps+=("setup: Python venv")
  setup_node || failed_steps+=("setup: npm packages")
fi
export PATH="$venv/bin:$PATH"

step "cargo fmt" cargo fmt --all -- --check
step "cargo clippy" cargo clippy --workspace --all-targets --locked -- -D warnings
# Integration tests spawn the workspace's binaries (sblocal, kedasim, servicebusdemo): build them all first.
step "cargo build" cargo build --workspace --locked
step "cargo test" cargo test --workspace --locked
# The README's first command, as a smoke test: the tutorial end to end on the binaries just built.
step "local demo" scripts/demo.sh --no-build --dir "$log_dir/demo"
step "SDK peers (pytest)" "$venv/bin/python" -m pytest tests/peers/python -q -p no:cacheprovider
if [ -f tests/peers/node/package.json ]; then
  step "SDK peers (node)" npm --prefix tests/peers/node test
fi
if [ -x scripts/check-deploy.sh ]; then
  step "deployment artifacts" scripts/check-deploy.sh
fi

note "summary"
if [ ${#failed_steps[@]} -gt 0 ]; then
  printf 'failed: %s\n' "${failed_steps[@]}"
fi
echo "total: $passed passed, $failed failed, $skipped skipped"
[ ${#failed_steps[@]} -eq 0 ]
