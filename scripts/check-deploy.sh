#!/usr/bin/env bash
# Checks the deployment artifacts: k8s/ (kustomize), scripts/, Dockerfile, compose.yaml and compose/Config.json.
#
#   scripts/check-deploy.sh
#
# Every check runs even when an earlier one failed; each prints "ok", "FAIL" (with the reasons) or "skip" (with
# the reason), and the last line is "checks: N passed, M failed, K skipped". Exit status 1 when any check failed.
#
# Tools come from PATH and .venv/bin (scripts/test.sh installs them): kubectl (kustomize), kubernetes-validate,
# check-jsonschema, hadolint, shellcheck, docker-compose, promtool, python3 with PyYAML. A missing tool fails the
# checks that need it. Inputs found beside the repository (the repository is cloned next to shared/):
#   ../shared/keda/crds/             KEDA's CRDs (ScaledJob, ScaledObject, TriggerAuthentication schemas)
#   ../shared/emulator/Config-schema.json   the Service Bus emulator's config schema
# and the built binaries: target/debug/servicebusdemo ($SERVICEBUSDEMO_BIN; the settings it accepts) and
# target/debug/sblocal ($SBLOCAL_BIN; it must load compose/Config.json). A check whose input is absent is skipped
# and says so. The structural checks themselves are in scripts/check_deploy.py.
set -uo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root" || exit 1
export PATH="$repo_root/.venv/bin:$PATH"

shared_dir=${SHARED_DIR:-$repo_root/../shared}
crd_dir=$shared_dir/keda/crds
emulator_schema=$shared_dir/emulator/Config-schema.json
binary=${SERVICEBUSDEMO_BIN:-${CARGO_TARGET_DIR:-$repo_root/target}/debug/servicebusdemo}
# Kubernetes versions whose schemas validate the core objects: the oldest and newest minor AKS supports
# around the manifests' writing, so an API removed or not yet served in either shows up.
read -r -a k8s_versions <<<"${K8S_VERSIONS:-1.30.0 1.33.0}"
variants=(base overlays/external-scaler overlays/external-scaler-tls overlays/prometheus)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
passed=0
failed=0
skipped=0

# check NAME FUNCTION [ARGS...]: runs FUNCTION, capturing its output; exit 0 = ok, 3 = skipped (its output is
# the reason), anything else = failed (its output is shown).
check() {
  local name=$1
  shift
  local out status
  out=$("$@" 2>&1)
  status=$?
  case $status in
    0)
      passed=$((passed + 1))
      local detail
      detail=$(printf '%s' "$out" | tail -n 1)
      printf 'ok    %s%s\n' "$name" "${detail:+: $detail}"
      ;;
    3)
      skipped=$((skipped + 1))
      printf 'skip  %s: %s\n' "$name" "$(printf '%s' "$out" | tail -n 1)"
      ;;
    *)
      failed=$((failed + 1))
      printf 'FAIL  %s\n' "$name"
      printf '%s\n' "$out" | sed 's/^/      /'
      ;;
  esac
}

# skip REASON: ends the check (each runs in its own subshell) as skipped.
skip() {
  echo "$*"
  exit 3
}

# need TOOL...: fails with a clear message when a tool is missing.
need() {
  local tool missing=()
  for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "missing tool(s): ${missing[*]} (scripts/test.sh installs them: Debian packages and .venv)"
    return 1
  fi
}

python=python3
[ -x "$repo_root/.venv/bin/python" ] && python=$repo_root/.venv/bin/python
# The structural checks (splitting rendered manifests, CRD schemas, pod policy, the env-var cross-check,
# compose and the tutorial command sequence) are in Python with PyYAML.
helper=$repo_root/scripts/check_deploy.py

# The checks.

check_tools() {
  need kubectl kubernetes-validate check-jsonschema hadolint shellcheck docker-compose promtool || return 1
  "$python" -c 'import yaml' 2>/dev/null || { echo "python3 lacks PyYAML (.venv: pip install pyyaml)"; return 1; }
}

rendered() { echo "$work/render/${1//\//_}.yaml"; }
objects() { echo "$work/objects/${1//\//_}"; }

check_render() {
  need kubectl || return 1
  mkdir -p "$work/render"
  local v status=0 n summary=()
  for v in "${variants[@]}"; do
    if ! kubectl kustomize "k8s/$v" >"$(rendered "$v")"; then
      echo "kubectl kustomize k8s/$v failed"
      status=1
      continue
    fi
    n=$("$python" "$helper" split "$(rendered "$v")" "$(objects "$v")") || { status=1; continue; }
    [ "$n" -gt 0 ] || { echo "kubectl kustomize k8s/$v rendered no objects"; status=1; }
    summary+=("$v $n")
  done
  [ $status -ne 0 ] || (IFS=,; echo "objects: ${summary[*]}")
  return $status
}

# Objects for which kubernetes-validate must report "passed".
check_core_schemas() {
  need kubernetes-validate || return 1
  local v version status=0 files out total=0
  for v in "${variants[@]}"; do
    [ -d "$(objects "$v")/core" ] || { echo "k8s/$v was not rendered"; status=1; continue; }
    files=("$(objects "$v")"/core/*.yaml)
    total=$((total + ${#files[@]}))
    for version in "${k8s_versions[@]}"; do
      if ! out=$(kubernetes-validate --strict -k "$version" "${files[@]}" 2>&1); then
        echo "k8s/$v (Kubernetes $version):"
        echo "$out"
        status=1
      elif [ "$(grep -c ' passed for resource ' <<<"$out")" -ne ${#files[@]} ]; then
        echo "k8s/$v: kubernetes-validate did not report every object as passed for $version:"
        echo "$out"
        status=1
      fi
    done
  done
  # The validator must reject what the API server rejects, or a pass means nothing.
  cat >"$work/broken-job.yaml" <<'EOF'
apiVersion: batch/v1
kind: Job
metadata: {name: broken}
spec:
  template:
    spec:
      restartPolicy: Never
      containers: [{name: c, image: i, envv: []}]
EOF
  if kubernetes-validate --strict -k "${k8s_versions[0]}" "$work/broken-job.yaml" >/dev/null 2>&1; then
    echo "kubernetes-validate accepted a Job with an unknown field: the check cannot fail"
    status=1
  fi
  [ $status -ne 0 ] || echo "$total objects passed for ${k8s_versions[*]}; a broken Job was rejected"
  return $status
}

check_keda_schemas() {
  [ -d "$crd_dir" ] || skip "KEDA CRDs not found at $crd_dir (the repository is expected beside shared/)"
  need check-jsonschema || return 1
  mkdir -p "$work/crd"
  local kinds
  kinds=$("$python" "$helper" crd-schemas "$crd_dir" "$work/crd") || return 1
  local v f kind status=0 count=0
  for v in "${variants[@]}"; do
    for f in "$(objects "$v")"/keda/*.json; do
      [ -e "$f" ] || continue
      kind=$(basename "$f" .json | cut -d- -f2)
      if [ ! -f "$work/crd/$kind.json" ]; then
        echo "k8s/$v: no CRD schema for $kind (have: $kinds)"
        status=1
        continue
      fi
      if ! check-jsonschema --schemafile "$work/crd/$kind.json" "$f" >"$work/cj.out" 2>&1; then
        echo "k8s/$v: $(basename "$f"):"
        cat "$work/cj.out"
        status=1
      fi
      count=$((count + 1))
    done
  done
  [ "$count" -gt 0 ] || { echo "no KEDA objects rendered"; status=1; }
  # A misspelled trigger field must be rejected, as the API server (strict field validation) would.
  cat >"$work/broken-scaledjob.json" <<'EOF'
{"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledJob", "metadata": {"name": "b"},
 "spec": {"jobTargetRef": {"template": {"spec": {"containers": [{"name": "c", "image": "i"}]}}},
          "triggers": [{"type": "external", "metdata": {"scalerAddress": "x:1"}}]}}
EOF
  if check-jsonschema --schemafile "$work/crd/ScaledJob.json" "$work/broken-scaledjob.json" >/dev/null 2>&1; then
    echo "the ScaledJob schema accepted a misspelled field: the check cannot fail"
    status=1
  fi
  [ $status -ne 0 ] || echo "$count KEDA objects valid against $kinds"
  return $status
}

check_policy() {
  local v status=0
  for v in "${variants[@]}"; do
    [ -s "$(rendered "$v")" ] || { echo "k8s/$v was not rendered"; status=1; continue; }
    "$python" "$helper" policy "$v" "$(rendered "$v")" | sed "s#^#k8s/$v: #"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  done
  [ $status -ne 0 ] || echo "${#variants[@]} builds"
  return $status
}

check_promql() {
  need promtool || return 1
  local r fallback=""
  r=$(rendered overlays/prometheus)
  [ -s "$r" ] || { echo "k8s/overlays/prometheus was not rendered"; return 1; }
  "$python" "$helper" extract "$r" scrape-config "$work/prometheus.yml" || return 1
  # Debian's prometheus is built without Kubernetes service discovery: when promtool does not know
  # kubernetes_sd_configs, check the rest of the job (relabelling, intervals) with static targets instead.
  if ! promtool check config --syntax-only "$work/prometheus.yml" >"$work/promtool.out" 2>&1; then
    if grep -q 'field kubernetes_sd_configs not found' "$work/promtool.out"; then
      fallback=" (with static targets: this promtool lacks Kubernetes service discovery)"
      "$python" "$helper" extract "$r" scrape-config-static "$work/prometheus-static.yml" || return 1
      promtool check config --syntax-only "$work/prometheus-static.yml" || return 1
    else
      cat "$work/promtool.out"
      return 1
    fi
  fi
  local n
  n=$("$python" "$helper" extract "$r" query-rules "$work/rules.yml") || return 1
  [ "$n" -ge 1 ] || { echo "no prometheus trigger query found"; return 1; }
  promtool check rules "$work/rules.yml" >"$work/promtool.out" 2>&1 || { cat "$work/promtool.out"; return 1; }
  echo "scrape job valid${fallback}, $n KEDA query parses as PromQL"
}

compose_config() {
  MSSQL_SA_PASSWORD=${MSSQL_SA_PASSWORD:-Check-Only-Passw0rd} docker-compose -f compose.yaml config
}

check_compose() {
  need docker-compose || return 1
  compose_config >"$work/compose.yaml" || return 1
  "$python" "$helper" compose "$work/compose.yaml" compose/Config.json
}

check_emulator_config() {
  [ -f "$emulator_schema" ] || skip "emulator schema not found at $emulator_schema"
  need check-jsonschema || return 1
  # The schema's patterns use ECMAScript character classes ([\w-\.]), hence the nonunicode regex variant.
  check-jsonschema --regex-variant nonunicode --schemafile "$emulator_schema" compose/Config.json >"$work/cj.out" 2>&1 ||
    { cat "$work/cj.out"; return 1; }
  sed 's/"MaxDeliveryCount": [0-9]*/"MaxDeliveryCount": 11/' compose/Config.json >"$work/bad-config.json"
  if check-jsonschema --regex-variant nonunicode --schemafile "$emulator_schema" "$work/bad-config.json" >/dev/null 2>&1; then
    echo "the emulator schema accepted MaxDeliveryCount 11: the check cannot fail"
    return 1
  fi
  echo "valid; an out-of-range MaxDeliveryCount was rejected"
}

# The local broker reads the same file as the emulator (the emulator's own format): it must start with it and
# serve the queue the compose services use.
check_sblocal_config() {
  local sblocal=${SBLOCAL_BIN:-${CARGO_TARGET_DIR:-$repo_root/target}/debug/sblocal}
  [ -x "$sblocal" ] || skip "$sblocal not built (cargo build -p sblocal); Config.json not tried with sblocal"
  [ -s "$work/compose.yaml" ] || compose_config >"$work/compose.yaml" || return 1
  local queue dir=$work/sblocal pid waited=0
  queue=$("$python" -c 'import sys, yaml
print(yaml.safe_load(open(sys.argv[1]))["services"]["producer"]["environment"]["AZURE_SERVICEBUS_QUEUE_NAME"])' \
    "$work/compose.yaml") || return 1
  mkdir -p "$dir"
  "$sblocal" serve --dir "$dir" --config compose/Config.json --amqp 127.0.0.1:0 --amqps 127.0.0.1:0 \
    --http 127.0.0.1:0 --https 127.0.0.1:0 >"$dir/out" 2>"$dir/err" &
  pid=$!
  while ! grep -qx ready "$dir/out" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null || [ $waited -ge 300 ]; then
      kill -TERM "$pid" 2>/dev/null
      wait "$pid" 2>/dev/null
      echo "sblocal did not become ready with compose/Config.json:"
      cat "$dir/err"
      return 1
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  kill -TERM "$pid"
  wait "$pid" 2>/dev/null
  if ! grep -qx "AZURE_SERVICEBUS_QUEUE_NAME=$queue" "$dir/emulator.env"; then
    echo "sblocal does not serve the compose services' queue '$queue':"
    cat "$dir/emulator.env"
    return 1
  fi
  echo "sblocal serves queue $queue from compose/Config.json"
}

check_env() {
  if [ ! -x "$binary" ]; then
    skip "$binary not built (cargo build -p servicebusdemo); env names not cross-checked"
  fi
  [ -s "$work/compose.yaml" ] || compose_config >"$work/compose.yaml" || return 1
  local v files=()
  for v in "${variants[@]}"; do files+=("$(rendered "$v")"); done
  "$python" "$helper" env "$binary" "$work/compose.yaml" "${files[@]}"
}

check_shellcheck() {
  need shellcheck || return 1
  local scripts=(scripts/*.sh)
  shellcheck --external-sources "${scripts[@]}" && echo "${scripts[*]}"
}

check_hadolint() {
  need hadolint || return 1
  hadolint Dockerfile || return 1
  "$python" "$helper" dockerfile Dockerfile && echo "hadolint clean, structure as expected"
}

# Runs tutorial.sh with az and kubectl replaced by stubs that record any call: a dry run must call neither.
tutorial_dry_run() {
  local stubs=$work/stubs
  mkdir -p "$stubs"
  local tool
  for tool in az kubectl; do
    printf '#!/bin/sh\necho "%s $*" >>"%s/called"\nexit 1\n' "$tool" "$stubs" >"$stubs/$tool"
    chmod +x "$stubs/$tool"
  done
  PATH="$stubs:$PATH" scripts/tutorial.sh "$@"
}

check_tutorial() {
  local status=0 variant out=$work/tutorial.out
  for variant in tutorial external-scaler external-scaler-tls prometheus; do
    if ! IMAGE=registry.example/servicebusdemo:1 SB_NAME=sbdemo tutorial_dry_run --dry-run --variant "$variant" up >"$out" 2>&1; then
      echo "tutorial.sh --dry-run --variant $variant up failed:"
      cat "$out"
      status=1
      continue
    fi
    "$python" "$helper" sequence "$variant" "$out" | sed "s/^/up ($variant): /"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  done
  for variant in verify down; do
    if ! SB_NAME=sbdemo tutorial_dry_run --dry-run "$variant" >"$out" 2>&1; then
      echo "tutorial.sh --dry-run $variant failed:"
      cat "$out"
      status=1
      continue
    fi
    "$python" "$helper" sequence "$variant" "$out" | sed "s/^/$variant: /"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  done
  # Without IMAGE the image is built in an Azure Container Registry before the manifests are applied.
  tutorial_dry_run --dry-run up 2>&1 | grep -E '^\+ (az acr|az aks update .*--attach-acr)' >"$out"
  "$python" "$helper" sequence acr "$out" | sed 's/^/acr: /'
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  if [ -e "$work/stubs/called" ]; then
    echo "--dry-run executed commands:"
    cat "$work/stubs/called"
    status=1
  fi
  # A real run without SB_NAME stops before touching Azure, with exit code 2.
  rm -f "$work/stubs/called"
  SB_NAME='' tutorial_dry_run up >/dev/null 2>&1
  local rc=$?
  if [ $rc -ne 2 ] || [ -e "$work/stubs/called" ]; then
    echo "tutorial.sh up without SB_NAME should exit 2 before calling az (exit $rc)"
    status=1
  fi
  if tutorial_dry_run --dry-run --variant nope up >/dev/null 2>&1; then
    echo "tutorial.sh accepted an unknown variant"
    status=1
  fi
  [ $status -ne 0 ] || echo "up (4 variants), verify, down, ACR build: every step in order; no az/kubectl executed"
  return $status
}

# Stubs standing in for Azure and the cluster: they log every call, answer the queries tutorial.sh makes
# with plausible values, and `kubectl apply -k` renders (with the real kubectl) what would be applied.
write_fake_cloud() {
  local dir=$1 real_kubectl
  real_kubectl=$(command -v kubectl)
  mkdir -p "$dir/bin" "$dir/state"
  cat >"$dir/bin/az" <<EOF
#!/usr/bin/env bash
state="$dir/state"
echo "az \$*" >>"\$state/calls"
uuid() { printf '%s' "\$1" | md5sum | sed -E 's/^(.{8})(.{4})(.{4})(.{4})(.{12}).*/\1-\2-\3-\4-\5/'; }
name() { local prev=""; for a in "\$@"; do [ "\$prev" = --name ] && { echo "\$a"; return; }; prev=\$a; done; }
case "\$*" in
  "aks create "*) touch "\$state/aks" ;;
  "aks show --name "*"--query [securityProfile"*) cat "\$state/features" 2>/dev/null || printf 'true\ttrue\ttrue\n' ;;
  "aks show --name "*"--query oidcIssuerProfile.issuerUrl"*) echo "https://oidc.example/issuer/" ;;
  "aks show --name "*"--query [workloadAutoScalerProfile"*) echo '[]' ;;
  "aks show --name "*) [ -e "\$state/aks" ] || exit 3 ;;
  "identity create "*"--query clientId"*) uuid "client-\$(name "\$@")" ;;
  "identity show "*"--query principalId"*) uuid "object-\$(name "\$@")" ;;
  "servicebus namespace show "*"--query id"*) echo "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ServiceBus/namespaces/\$(name "\$@")" ;;
  "servicebus queue show "*) echo 0 ;;
  "monitor account show "*"--query id"*) echo "/subscriptions/s/resourceGroups/rg/providers/microsoft.monitor/accounts/\$(name "\$@")" ;;
  "monitor account show "*"--query metrics.prometheusQueryEndpoint"*) echo "https://amw.example.prometheus.monitor.azure.com" ;;
  "group exists "*) echo true ;;
  *) : ;;
esac
EOF
  cat >"$dir/bin/kubectl" <<EOF
#!/usr/bin/env bash
state="$dir/state"
echo "kubectl \$*" >>"\$state/calls"
case "\$*" in
  "get pod --namespace kube-system -l app.kubernetes.io/name=keda-operator"*) echo keda-operator-7d9c ;;
  "get pod keda-operator-7d9c "*) cat "\$state/keda-env" 2>/dev/null || echo "AZURE_CLIENT_ID AZURE_TENANT_ID AZURE_FEDERATED_TOKEN_FILE AZURE_AUTHORITY_HOST" ;;
  "apply -k "*) "$real_kubectl" kustomize "\$3" >"\$state/applied.yaml" ;;
  "create secret "*) exec "$real_kubectl" "\$@" ;;
  "apply -f -"*) { echo ---; cat; } >>"\$state/applied-secrets.yaml" ;;
  "get secret "*) [ -s "\$state/applied-secrets.yaml" ] || exit 1 ;;
  "get jobs "*) for i in 1 2 3 4 5 6 7 8 9 10; do echo "job.batch/myconsumer-scaledjob-\$i"; done ;;
  *) : ;;
esac
EOF
  chmod +x "$dir/bin/az" "$dir/bin/kubectl"
}

uuid_of() {
  printf '%s' "$1" | md5sum | sed -E 's/^(.{8})(.{4})(.{4})(.{4})(.{12}).*/\1-\2-\3-\4-\5/'
}

# tutorial.sh for real, against the stubs: values flow from Azure's answers into the applied manifests, a
# second `up` reuses the cluster, a cluster lacking a feature gets only that feature, verify passes on a
# drained queue, and a keda-operator without the injected variables stops the run.
check_tutorial_fake_cloud() {
  need kubectl md5sum || return 1
  local fake=$work/fake status=0 rc client_id
  write_fake_cloud "$fake"
  run_fake() {
    env PATH="$fake/bin:$PATH" SB_NAME=fakesb IMAGE=registry.example/servicebusdemo:fake TIMEOUT=0 \
      scripts/tutorial.sh "$@" >"$fake/out" 2>&1
  }
  if ! run_fake up; then
    echo "tutorial.sh up failed against the stubs:"
    cat "$fake/out"
    return 1
  fi
  grep -q '^az aks create ' "$fake/state/calls" || { echo "first up did not create the cluster"; status=1; }
  "$python" "$helper" policy base "$fake/state/applied.yaml" | sed 's/^/applied: /'
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  client_id=$(uuid_of client-servicebusdemo)
  [ "$(grep -c "$client_id" "$fake/state/applied.yaml")" -eq 2 ] ||
    { echo "the identity's client id did not reach the ServiceAccount and the TriggerAuthentication"; status=1; }
  grep -q "azure.workload.identity/client-id=$client_id" "$fake/state/calls" ||
    { echo "keda-operator was not annotated with the identity's client id"; status=1; }
  grep -q "assignee-object-id $(uuid_of object-servicebusdemo) " "$fake/state/calls" ||
    { echo "the role assignment did not use the identity's object id"; status=1; }
  grep -q 'value: fakesb.servicebus.windows.net' "$fake/state/applied.yaml" ||
    { echo "the Service Bus host name did not reach the manifests"; status=1; }

  : >"$fake/state/calls"
  run_fake up || { echo "second up failed:"; cat "$fake/out"; status=1; }
  if grep -qE '^az aks (create|update) ' "$fake/state/calls"; then
    echo "a second up should reuse the existing cluster unchanged:"
    grep -E '^az aks (create|update) ' "$fake/state/calls"
    status=1
  fi
  printf 'true\tfalse\ttrue\n' >"$fake/state/features"
  : >"$fake/state/calls"
  run_fake up || { echo "up on a cluster without the OIDC issuer failed:"; cat "$fake/out"; status=1; }
  grep -qx 'az aks update --name servicebusdemo-aks --resource-group servicebusdemo-rg --enable-oidc-issuer' \
    "$fake/state/calls" || { echo "a missing OIDC issuer should be enabled, alone, with az aks update"; status=1; }
  rm -f "$fake/state/features"

  run_fake verify || { echo "verify failed against a drained queue and 10 jobs:"; cat "$fake/out"; status=1; }
  grep -q 'KEDA created 10 jobs' "$fake/out" || { echo "verify did not report the 10 jobs"; status=1; }

  : >"$fake/state/calls"
  run_fake --variant external-scaler up || { echo "external-scaler up failed:"; cat "$fake/out"; status=1; }
  "$python" "$helper" policy overlays/external-scaler "$fake/state/applied.yaml" | sed 's/^/applied (external-scaler): /'
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  if grep -q 'keda-operator' "$fake/state/calls"; then
    echo "the external-scaler variant must not touch keda-operator's identity"
    status=1
  fi

  echo "AZURE_CLIENT_ID" >"$fake/state/keda-env"
  run_fake up
  rc=$?
  if [ $rc -ne 2 ] || ! grep -q 'lacks AZURE_TENANT_ID AZURE_FEDERATED_TOKEN_FILE AZURE_AUTHORITY_HOST' "$fake/out"; then
    echo "a keda-operator without the webhook's variables should stop up with exit 2 (exit $rc):"
    cat "$fake/out"
    status=1
  fi
  rm -f "$fake/state/keda-env"

  run_fake down || { echo "down failed:"; cat "$fake/out"; status=1; }
  grep -q '^az group delete --name servicebusdemo-rg --yes --no-wait' "$fake/state/calls" ||
    { echo "down did not delete the resource group"; status=1; }
  [ $status -ne 0 ] || echo "up (new cluster, again, partial cluster), verify, external-scaler, KEDA env check, down"
  return $status
}

# The TLS variant end to end without a cluster: tutorial.sh makes the CA and certificates and applies the
# Secrets (captured by the kubectl stub); the scaler then runs with the overlay's TLS settings resolved to those
# Secrets' files, and must accept KEDA's client certificate (as the TriggerAuthentication hands it to KEDA)
# for the scalerAddress host name, and refuse a client without one.
check_scaler_tls() {
  [ -x "$binary" ] || skip "$binary not built (cargo build -p servicebusdemo); the TLS handshake not tried"
  need kubectl openssl md5sum || return 1
  local fake=$work/fake-tls
  write_fake_cloud "$fake"
  if ! env PATH="$fake/bin:$PATH" SB_NAME=fakesb IMAGE=registry.example/servicebusdemo:fake \
    scripts/tutorial.sh --variant external-scaler-tls up >"$fake/out" 2>&1; then
    echo "tutorial.sh --variant external-scaler-tls up failed against the stubs:"
    cat "$fake/out"
    return 1
  fi
  "$python" "$helper" policy overlays/external-scaler-tls "$fake/state/applied.yaml" || return 1
  "$python" "$helper" tls-probe "$binary" "$fake/state/applied.yaml" "$fake/state/applied-secrets.yaml"
}

# tutorial.sh fills a copy of settings.env from Azure's answers: its copy must carry every key the manifests
# use, and the result must pass the same structural checks with the given values in place.
check_tutorial_render() {
  need kubectl || return 1
  local variant overlay status=0 out=$work/tutorial-render.yaml
  for variant in tutorial external-scaler external-scaler-tls prometheus; do
    overlay=overlays/$variant
    [ "$variant" = tutorial ] && overlay=base
    if ! SB_NAME=rendersb IMAGE=registry.example/servicebusdemo:check \
      MI_CLIENT_ID=11111111-1111-1111-1111-111111111111 PRODUCER_CLIENT_ID=22222222-2222-2222-2222-222222222222 \
      CONSUMER_CLIENT_ID=33333333-3333-3333-3333-333333333333 SCALER_CLIENT_ID=44444444-4444-4444-4444-444444444444 \
      KEDA_CLIENT_ID=55555555-5555-5555-5555-555555555555 \
      PROMETHEUS_QUERY_ENDPOINT=https://render.example.prometheus.monitor.azure.com \
      scripts/tutorial.sh --variant "$variant" render >"$out" 2>"$work/tutorial-render.err"; then
      echo "tutorial.sh --variant $variant render failed:"
      cat "$work/tutorial-render.err"
      status=1
      continue
    fi
    "$python" "$helper" policy "$overlay" "$out" | sed "s/^/render ($variant): /"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    local want
    for want in "rendersb.servicebus.windows.net" "image: registry.example/servicebusdemo:check"; do
      grep -qF "$want" "$out" || { echo "render ($variant): '$want' missing"; status=1; }
    done
  done
  [ $status -ne 0 ] || echo "4 variants rendered with the given values and passed the structural checks"
  return $status
}

check_image_build() {
  [ -n "${CHECK_IMAGE_BUILD:-}" ] || skip "image build not requested (CHECK_IMAGE_BUILD=1 builds it with podman or buildah)"
  local builder
  for builder in podman buildah; do
    if command -v "$builder" >/dev/null 2>&1; then
      if [ "$builder" = podman ]; then
        podman build --quiet -t servicebusdemo:check . >/dev/null || return 1
      else
        buildah bud --quiet -t servicebusdemo:check . >/dev/null || return 1
      fi
      echo "built with $builder"
      return 0
    fi
  done
  skip "neither podman nor buildah installed; image not built (hadolint and the structure check still ran)"
}

echo "deployment artifacts ($repo_root)"
check "tools installed" check_tools
check "kustomize renders base and overlays" check_render
check "core objects match Kubernetes ${k8s_versions[*]} schemas (kubernetes-validate --strict)" check_core_schemas
check "KEDA objects match KEDA's CRD schemas" check_keda_schemas
check "pod hardening, identities and variant structure" check_policy
check "Prometheus scrape config and KEDA query (promtool)" check_promql
check "compose.yaml (docker-compose config, emulator, connection cap)" check_compose
check "compose/Config.json matches the emulator's schema" check_emulator_config
check "compose/Config.json configures sblocal too" check_sblocal_config
check "env names set by manifests and compose are accepted by the binary" check_env
check "shellcheck scripts/*.sh" check_shellcheck
check "Dockerfile (hadolint, multi-stage, distroless nonroot)" check_hadolint
check "tutorial.sh --dry-run prints the tutorial's commands in order" check_tutorial
check "tutorial.sh render fills every placeholder from its settings" check_tutorial_render
check "tutorial.sh up/verify/down against stubbed az and kubectl" check_tutorial_fake_cloud
check "external-scaler-tls: the scaler serves mutual TLS with tutorial.sh's certificates" check_scaler_tls
check "image builds (podman/buildah)" check_image_build
echo "checks: $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
