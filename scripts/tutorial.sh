#!/usr/bin/env bash
# Runs Microsoft's AKS tutorial "Securely scale your applications using the KEDA add-on and workload identity"
# end to end with the servicebusdemo image, step by step as the article writes them, plus the steps readers miss
# (annotating the keda-operator ServiceAccount, restarting KEDA and checking the injected environment).
#
#   scripts/tutorial.sh [--dry-run] [--variant VARIANT] up|verify|down|render
#
#   up       create (or reuse) every Azure resource, federate the identities, apply the manifests
#   verify   wait for the producer, then for KEDA to drain the queue ("KEDAJobsCreated ... Created 10 jobs")
#   down     delete the resource group (everything `up` created)
#   render   print the manifests `up` would apply, filled from the environment (no Azure calls; client ids
#            not given as MI_CLIENT_ID, PRODUCER_CLIENT_ID, ... are shown as zero UUIDs)
#
# Variants (k8s/ holds one kustomization each):
#   tutorial         k8s/base: one identity with "Azure Service Bus Data Owner", shared by the workloads and by
#                    KEDA's built-in azure-servicebus scaler (federated to kube-system:keda-operator)
#   external-scaler  k8s/overlays/external-scaler: our scaler answers KEDA over gRPC; one least-privilege
#                    identity per role, and KEDA holds no Azure identity at all
#   external-scaler-tls  the same with mutual TLS on the scaler's gRPC port (certificates from a private CA
#                    made with openssl, kept in two Secrets)
#   prometheus       k8s/overlays/prometheus: the scaler exports the queue depth, Azure Managed Prometheus
#                    scrapes it, KEDA scales a worker Deployment with a prometheus trigger
#
# Settings (environment variables, named as in the tutorial; defaults in brackets):
#   LOCATION [eastus]  RG_NAME [servicebusdemo-rg]  AKS_NAME [servicebusdemo-aks]
#   SB_NAME (required: globally unique Service Bus namespace)  SB_QUEUE_NAME [servicebusdemo]
#   MI_NAME [servicebusdemo]  FED_WORKLOAD [servicebusdemo-workload]  FED_KEDA [servicebusdemo-keda]
#   IMAGE: the servicebusdemo image to run; when unset, ACR_NAME (required then) gets an Azure Container
#          Registry attached to the cluster and `az acr build` builds this repository's Dockerfile into it.
#   AMW_NAME [servicebusdemo-amw]: Azure Monitor workspace (prometheus variant)
#   VARIANT: same as --variant.  TIMEOUT [600]: seconds `verify` waits for the queue to drain.
#
# Every command is printed before it runs; --dry-run prints them and runs none (values that would come from
# Azure are shown as <NAME>). Re-running `up` is safe: every step creates or updates in place.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

die() {
  echo "tutorial.sh: $*" >&2
  exit 2
}

dry_run=false
variant=${VARIANT:-tutorial}
action=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=true ;;
    --variant) [ $# -ge 2 ] || die "--variant needs a value"; variant=$2; shift ;;
    --variant=*) variant=${1#--variant=} ;;
    -h | --help) usage; exit 0 ;;
    up | verify | down | render) [ -z "$action" ] || die "only one action: up, verify, down or render"; action=$1 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
[ -n "$action" ] || die "missing action: up, verify, down or render (see --help)"
case "$variant" in
  tutorial) overlay=base ;;
  external-scaler | external-scaler-tls | prometheus) overlay=overlays/$variant ;;
  *) die "unknown variant '$variant' (tutorial, external-scaler, external-scaler-tls, prometheus)" ;;
esac

LOCATION=${LOCATION:-eastus}
RG_NAME=${RG_NAME:-servicebusdemo-rg}
AKS_NAME=${AKS_NAME:-servicebusdemo-aks}
SB_QUEUE_NAME=${SB_QUEUE_NAME:-servicebusdemo}
MI_NAME=${MI_NAME:-servicebusdemo}
FED_WORKLOAD=${FED_WORKLOAD:-servicebusdemo-workload}
FED_KEDA=${FED_KEDA:-servicebusdemo-keda}
AMW_NAME=${AMW_NAME:-servicebusdemo-amw}
TIMEOUT=${TIMEOUT:-600}
if [ -z "${SB_NAME:-}" ]; then
  $dry_run || die "SB_NAME is required (a globally unique Service Bus namespace name)"
  SB_NAME="<SB_NAME>"
fi
SB_HOSTNAME="${SB_NAME}.servicebus.windows.net"
case "$TIMEOUT" in '' | *[!0-9]*) die "TIMEOUT must be a number of seconds, got '$TIMEOUT'" ;; esac

# The manifests' ServiceAccounts (k8s/); workloads run in namespace default as in the tutorial.
readonly K8S_NAMESPACE=default
readonly SA_TUTORIAL=servicebusdemo
readonly ROLE_OWNER="Azure Service Bus Data Owner"
readonly ROLE_SENDER="Azure Service Bus Data Sender"
readonly ROLE_RECEIVER="Azure Service Bus Data Receiver"

# Prints a command the way a user would type it: plain words bare, anything else single-quoted.
show() {
  local out="+" arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
      out+=" $arg"
    else
      out+=" '${arg//\'/\'\\\'\'}'"
    fi
  done
  printf '%s\n' "$out"
}

# Runs a command (after printing it), or only prints it with --dry-run.
run() {
  show "$@"
  $dry_run || "$@"
}

# capture VAR cmd...: runs cmd and stores its trimmed stdout in VAR; with --dry-run VAR becomes "<VAR>".
capture() {
  local var=$1
  shift
  local line
  line=$(show "$@")
  # shellcheck disable=SC2016 # the $( ) is printed for the reader, not expanded
  printf '+ %s=$(%s)\n' "$var" "${line#+ }"
  if $dry_run; then
    printf -v "$var" '<%s>' "$var"
  else
    local value
    value=$("$@")
    value=${value//$'\r'/}
    [ -n "$value" ] || die "$var: '$*' returned nothing"
    printf -v "$var" '%s' "$value"
  fi
}

# exists cmd...: true when a read-only query succeeds; with --dry-run nothing exists, so creates are printed.
exists() {
  $dry_run && return 1
  "$@" >/dev/null 2>&1
}

step() {
  printf '\n# %s\n' "$*"
}

create_resource_group() {
  step "Create a resource group"
  run az group create --name "$RG_NAME" --location "$LOCATION"
}

create_cluster() {
  step "Create an AKS cluster with KEDA, workload identity and the OIDC issuer"
  if exists az aks show --name "$AKS_NAME" --resource-group "$RG_NAME"; then
    enable_missing_features
  else
    # The variants restrict the scaler with a NetworkPolicy, which only a policy engine enforces: Azure CNI
    # overlay with the Cilium dataplane. The tutorial's own cluster stays as the article creates it.
    local policy_flags=()
    [ "$variant" = tutorial ] ||
      policy_flags=(--network-plugin azure --network-plugin-mode overlay --network-dataplane cilium)
    run az aks create --name "$AKS_NAME" --resource-group "$RG_NAME" \
      --enable-workload-identity --enable-oidc-issuer --enable-keda --generate-ssh-keys "${policy_flags[@]}"
  fi
  run az aks show --name "$AKS_NAME" --resource-group "$RG_NAME" \
    --query "[workloadAutoScalerProfile, securityProfile, oidcIssuerProfile]"
  run az aks get-credentials --name "$AKS_NAME" --resource-group "$RG_NAME" --overwrite-existing
}

# An existing cluster gets only the features it lacks (az aks update refuses no-op feature flags on some
# CLI versions, and every update is a long-running operation).
enable_missing_features() {
  local state flags=()
  state=$(az aks show --name "$AKS_NAME" --resource-group "$RG_NAME" --output tsv \
    --query "[securityProfile.workloadIdentity.enabled, oidcIssuerProfile.enabled, workloadAutoScalerProfile.keda.enabled, networkProfile.networkPolicy]")
  read -r -a state <<<"$(printf '%s' "$state" | tr '\n\t' '  ')"
  [ "${state[0]:-}" = true ] || flags+=(--enable-workload-identity)
  [ "${state[1]:-}" = true ] || flags+=(--enable-oidc-issuer)
  [ "${state[2]:-}" = true ] || flags+=(--enable-keda)
  if [ "$variant" != tutorial ] && [[ "${state[3]:-none}" =~ ^(none|None|null)$ ]]; then
    echo "warning: cluster $AKS_NAME has no network policy engine: the scaler's NetworkPolicy will not be" \
      "enforced (create the cluster with --network-dataplane cilium, or use TLS for the scaler)" >&2
  fi
  if [ ${#flags[@]} -eq 0 ]; then
    echo "cluster $AKS_NAME exists with workload identity, OIDC issuer and KEDA enabled"
  else
    run az aks update --name "$AKS_NAME" --resource-group "$RG_NAME" "${flags[@]}"
  fi
}

create_service_bus() {
  step "Create an Azure Service Bus namespace (Entra only: local SAS auth disabled) and queue"
  run az servicebus namespace create --name "$SB_NAME" --resource-group "$RG_NAME" --disable-local-auth
  run az servicebus queue create --name "$SB_QUEUE_NAME" --namespace-name "$SB_NAME" --resource-group "$RG_NAME"
}

# create_identity NAME VAR: creates (or updates) a user-assigned managed identity and stores its client id.
create_identity() {
  capture "$2" az identity create --name "$1" --resource-group "$RG_NAME" --query clientId --output tsv
}

oidc_issuer() {
  capture AKS_OIDC_ISSUER az aks show --name "$AKS_NAME" --resource-group "$RG_NAME" \
    --query oidcIssuerProfile.issuerUrl --output tsv
}

# federate CREDENTIAL IDENTITY NAMESPACE SERVICEACCOUNT
federate() {
  run az identity federated-credential create --name "$1" --identity-name "$2" --resource-group "$RG_NAME" \
    --issuer "$AKS_OIDC_ISSUER" --subject "system:serviceaccount:$3:$4" --audience api://AzureADTokenExchange
}

service_bus_id() {
  capture SB_ID az servicebus namespace show --name "$SB_NAME" --resource-group "$RG_NAME" --query id --output tsv
}

# object_id VAR IDENTITY: the identity's service principal object id, for role assignments.
object_id() {
  capture "$1" az identity show --name "$2" --resource-group "$RG_NAME" --query principalId --output tsv
}

# assign_role ROLE OBJECT_ID SCOPE
assign_role() {
  run az role assignment create --role "$1" --assignee-object-id "$2" \
    --assignee-principal-type ServicePrincipal --scope "$3"
}

# The step the article's readers miss (Azure/AKS#5243): without the client-id annotation the webhook injects
# nothing into keda-operator and KEDA's azure-workload authentication fails with AADSTS70021.
enable_keda_workload_identity() {
  local client_id=$1
  step "Enable workload identity on the KEDA operator"
  run kubectl annotate serviceaccount keda-operator --namespace kube-system \
    "azure.workload.identity/client-id=$client_id" --overwrite
  run kubectl rollout restart deployment keda-operator --namespace kube-system
  run kubectl rollout status deployment keda-operator --namespace kube-system --timeout=300s
  capture KEDA_POD_ID kubectl get pod --namespace kube-system -l app.kubernetes.io/name=keda-operator \
    --output 'jsonpath={.items[0].metadata.name}'
  run kubectl describe pod "$KEDA_POD_ID" --namespace kube-system
  check_keda_env
}

# The tutorial asks the reader to look for four variables in `kubectl describe`; check them instead.
check_keda_env() {
  capture KEDA_ENV kubectl get pod "$KEDA_POD_ID" --namespace kube-system \
    --output 'jsonpath={.spec.containers[*].env[*].name}'
  $dry_run && return 0
  local name missing=()
  for name in AZURE_CLIENT_ID AZURE_TENANT_ID AZURE_FEDERATED_TOKEN_FILE AZURE_AUTHORITY_HOST; do
    [[ " $KEDA_ENV " == *" $name "* ]] || missing+=("$name")
  done
  [ ${#missing[@]} -eq 0 ] ||
    die "keda-operator pod $KEDA_POD_ID lacks ${missing[*]}: is the workload identity webhook running?"
  echo "keda-operator has AZURE_CLIENT_ID, AZURE_TENANT_ID, AZURE_FEDERATED_TOKEN_FILE, AZURE_AUTHORITY_HOST"
}

tutorial_identities() {
  step "Create the managed identity and federate it with the workload and with keda-operator"
  create_identity "$MI_NAME" MI_CLIENT_ID
  oidc_issuer
  federate "$FED_WORKLOAD" "$MI_NAME" "$K8S_NAMESPACE" "$SA_TUTORIAL"
  federate "$FED_KEDA" "$MI_NAME" kube-system keda-operator
  step "Create the role assignment"
  object_id MI_OBJECT_ID "$MI_NAME"
  service_bus_id
  assign_role "$ROLE_OWNER" "$MI_OBJECT_ID" "$SB_ID"
  enable_keda_workload_identity "$MI_CLIENT_ID"
}

# One identity per role, named like its ServiceAccount; KEDA itself gets none.
least_privilege_identities() {
  step "Create one least-privilege identity per role, federated with its ServiceAccount"
  oidc_issuer
  service_bus_id
  local role
  for role in producer consumer scaler; do
    local upper
    upper=$(printf '%s' "$role" | tr '[:lower:]' '[:upper:]')
    create_identity "$MI_NAME-$role" "${upper}_CLIENT_ID"
    federate "$FED_WORKLOAD-$role" "$MI_NAME-$role" "$K8S_NAMESPACE" "servicebusdemo-$role"
  done
  object_id PRODUCER_OBJECT_ID "$MI_NAME-producer"
  assign_role "$ROLE_SENDER" "$PRODUCER_OBJECT_ID" "$SB_ID"
  object_id CONSUMER_OBJECT_ID "$MI_NAME-consumer"
  assign_role "$ROLE_RECEIVER" "$CONSUMER_OBJECT_ID" "$SB_ID"
  # The management (ATOM) endpoint that reports the queue depth requires Manage rights.
  object_id SCALER_OBJECT_ID "$MI_NAME-scaler"
  assign_role "$ROLE_OWNER" "$SCALER_OBJECT_ID" "$SB_ID"
}

# Azure Managed Prometheus: a workspace, the metrics add-on, and KEDA's read access to the workspace.
managed_prometheus() {
  step "Create an Azure Monitor workspace and enable Azure Managed Prometheus on the cluster"
  run az monitor account create --name "$AMW_NAME" --resource-group "$RG_NAME" --location "$LOCATION"
  capture AMW_ID az monitor account show --name "$AMW_NAME" --resource-group "$RG_NAME" --query id --output tsv
  capture PROMETHEUS_QUERY_ENDPOINT az monitor account show --name "$AMW_NAME" --resource-group "$RG_NAME" \
    --query metrics.prometheusQueryEndpoint --output tsv
  run az aks update --name "$AKS_NAME" --resource-group "$RG_NAME" \
    --enable-azure-monitor-metrics --azure-monitor-workspace-resource-id "$AMW_ID"
  step "Give KEDA an identity that may read the workspace (and nothing in Service Bus)"
  create_identity "$MI_NAME-keda" KEDA_CLIENT_ID
  federate "$FED_KEDA" "$MI_NAME-keda" kube-system keda-operator
  object_id KEDA_OBJECT_ID "$MI_NAME-keda"
  assign_role "Monitoring Data Reader" "$KEDA_OBJECT_ID" "$AMW_ID"
  enable_keda_workload_identity "$KEDA_CLIENT_ID"
}

resolve_image() {
  if [ -n "${IMAGE:-}" ]; then
    return 0
  fi
  step "Build the servicebusdemo image in an Azure Container Registry attached to the cluster"
  if [ -z "${ACR_NAME:-}" ]; then
    $dry_run || die "set IMAGE to a servicebusdemo image, or ACR_NAME to build one"
    ACR_NAME="<ACR_NAME>"
  fi
  local tag
  tag=$(git -C "$repo_root" rev-parse --short HEAD 2>/dev/null || echo latest)
  run az acr create --name "$ACR_NAME" --resource-group "$RG_NAME" --sku Basic
  run az aks update --name "$AKS_NAME" --resource-group "$RG_NAME" --attach-acr "$ACR_NAME"
  run az acr build --registry "$ACR_NAME" --image "servicebusdemo:$tag" "$repo_root"
  IMAGE="$ACR_NAME.azurecr.io/servicebusdemo:$tag"
}

# Temporary directories (rendered manifests, the TLS CA's key) are removed however the script ends.
temp_dirs=()
work=""
cleanup() {
  [ ${#temp_dirs[@]} -eq 0 ] || rm -rf "${temp_dirs[@]}"
}
trap cleanup EXIT

# new_temp_dir VAR: creates a private temporary directory, removed at exit, and stores its path in VAR.
new_temp_dir() {
  local dir
  dir=$(mktemp -d)
  temp_dirs+=("$dir")
  printf -v "$1" '%s' "$dir"
}

# apply_secret NAME KEY=FILE...: creates or updates a generic Secret from files (idempotent).
apply_secret() {
  local name=$1
  shift
  local from=() pair
  for pair in "$@"; do from+=("--from-file=$pair"); done
  local line
  line=$(show kubectl create secret generic "$name" --namespace "$K8S_NAMESPACE" "${from[@]}" \
    --dry-run=client --output yaml)
  printf '%s | kubectl apply -f -\n' "$line"
  $dry_run && return 0
  kubectl create secret generic "$name" --namespace "$K8S_NAMESPACE" "${from[@]}" --dry-run=client --output yaml |
    kubectl apply -f -
}

# Mutual TLS between KEDA and the scaler: one private CA signs the scaler's server certificate (for its
# Service name) and KEDA's client certificate. Existing Secrets are kept, so re-running up does not rotate them.
scaler_tls_secrets() {
  step "Create the scaler's mutual-TLS certificates and Secrets"
  if exists kubectl get secret servicebusdemo-scaler-tls --namespace "$K8S_NAMESPACE" &&
    exists kubectl get secret servicebusdemo-keda-client-tls --namespace "$K8S_NAMESPACE"; then
    echo "Secrets servicebusdemo-scaler-tls and servicebusdemo-keda-client-tls exist; keeping them"
    return 0
  fi
  local tls host="servicebusdemo-scaler.$K8S_NAMESPACE.svc.cluster.local"
  new_temp_dir tls
  run openssl req -x509 -newkey rsa:3072 -nodes -days 365 -subj /CN=servicebusdemo-scaler-ca \
    -keyout "$tls/ca.key" -out "$tls/ca.crt"
  run openssl req -newkey rsa:3072 -nodes -subj "/CN=$host" -addext "subjectAltName=DNS:$host" \
    -addext extendedKeyUsage=serverAuth -keyout "$tls/server.key" -out "$tls/server.csr"
  run openssl x509 -req -in "$tls/server.csr" -CA "$tls/ca.crt" -CAkey "$tls/ca.key" -CAcreateserial \
    -days 365 -copy_extensions copy -out "$tls/server.crt"
  run openssl req -newkey rsa:3072 -nodes -subj /CN=keda-operator -addext extendedKeyUsage=clientAuth \
    -keyout "$tls/client.key" -out "$tls/client.csr"
  run openssl x509 -req -in "$tls/client.csr" -CA "$tls/ca.crt" -CAkey "$tls/ca.key" -CAcreateserial \
    -days 365 -copy_extensions copy -out "$tls/client.crt"
  apply_secret servicebusdemo-scaler-tls "tls.crt=$tls/server.crt" "tls.key=$tls/server.key" "ca.crt=$tls/ca.crt"
  apply_secret servicebusdemo-keda-client-tls "tls.crt=$tls/client.crt" "tls.key=$tls/client.key" "ca.crt=$tls/ca.crt"
}

# Copies k8s/ to a temporary tree whose settings.env holds this run's values: the repository stays untouched
# and the placeholders are filled by kustomize (k8s/components/placeholders).
render_settings() {
  new_temp_dir work
  cp -R "$repo_root/k8s" "$work/k8s"
  local unused="00000000-0000-0000-0000-000000000000"
  cat >"$work/k8s/components/settings/settings.env" <<EOF
IMAGE=$IMAGE
SB_NAME=$SB_NAME
SB_HOSTNAME=$SB_HOSTNAME
SB_QUEUE_NAME=$SB_QUEUE_NAME
MI_CLIENT_ID=${MI_CLIENT_ID:-$unused}
PRODUCER_CLIENT_ID=${PRODUCER_CLIENT_ID:-$unused}
CONSUMER_CLIENT_ID=${CONSUMER_CLIENT_ID:-$unused}
SCALER_CLIENT_ID=${SCALER_CLIENT_ID:-$unused}
KEDA_CLIENT_ID=${KEDA_CLIENT_ID:-$unused}
PROMETHEUS_QUERY_ENDPOINT=${PROMETHEUS_QUERY_ENDPOINT:-https://unused.invalid}
EOF
  {
    echo "# settings for k8s/$overlay:"
    sed 's/^/#   /' "$work/k8s/components/settings/settings.env"
  } >&2
}

apply_manifests() {
  step "Deploy the ServiceAccount(s), the producer Job and the consumer (k8s/$overlay)"
  render_settings
  run kubectl apply -k "$work/k8s/$overlay"
  if [ "$variant" != tutorial ]; then
    run kubectl rollout status deployment servicebusdemo-scaler --namespace "$K8S_NAMESPACE" --timeout=300s
  fi
}

up() {
  create_resource_group
  create_cluster
  create_service_bus
  case "$variant" in
    tutorial) tutorial_identities ;;
    external-scaler) least_privilege_identities ;;
    external-scaler-tls) least_privilege_identities; scaler_tls_secrets ;;
    prometheus) least_privilege_identities; managed_prometheus ;;
  esac
  resolve_image
  apply_manifests
  echo
  echo "Applied. Next: scripts/tutorial.sh --variant $variant verify"
}

active_messages() {
  az servicebus queue show --name "$SB_QUEUE_NAME" --namespace-name "$SB_NAME" --resource-group "$RG_NAME" \
    --query countDetails.activeMessageCount --output tsv
}

# Jobs KEDA created for the ScaledJob (it labels them with the ScaledJob's name). Counting Jobs rather than
# summing events: Kubernetes folds repeated identical events ("Created 1 jobs") into one with a count.
jobs_created() {
  kubectl get jobs --namespace "$K8S_NAMESPACE" -l scaledjob.keda.sh/name=myconsumer-scaledjob \
    --output name | wc -l | tr -d ' '
}

verify() {
  step "Wait for the producer Job to send its 100 messages"
  run kubectl wait --for=condition=complete job/myproducer --namespace "$K8S_NAMESPACE" --timeout=300s
  run kubectl logs job/myproducer --namespace "$K8S_NAMESPACE" --tail=5
  if [ "$variant" = prometheus ]; then
    step "Watch KEDA scale the worker Deployment on the Prometheus query"
    run kubectl get scaledobject myconsumer-scaledobject --namespace "$K8S_NAMESPACE"
    run kubectl get hpa --namespace "$K8S_NAMESPACE" -l scaledobject.keda.sh/name=myconsumer-scaledobject
  else
    step "Verify the KEDA scaler worked as intended"
    run kubectl describe scaledjob myconsumer-scaledjob --namespace "$K8S_NAMESPACE"
  fi
  step "Wait until the queue is drained"
  show az servicebus queue show --name "$SB_QUEUE_NAME" --namespace-name "$SB_NAME" --resource-group "$RG_NAME" \
    --query countDetails.activeMessageCount --output tsv
  if [ "$variant" != prometheus ]; then
    show kubectl get jobs --namespace "$K8S_NAMESPACE" -l scaledjob.keda.sh/name=myconsumer-scaledjob --output name
  fi
  $dry_run && return 0
  local waited=0 active created=0
  while :; do
    active=$(active_messages)
    [ "$variant" = prometheus ] || created=$(jobs_created)
    echo "active messages: $active, jobs created: $created"
    if [ "$active" = 0 ]; then
      break
    fi
    [ "$waited" -lt "$TIMEOUT" ] || die "queue $SB_QUEUE_NAME still holds $active messages after ${TIMEOUT}s"
    sleep 10
    waited=$((waited + 10))
  done
  if [ "$variant" != prometheus ]; then
    run kubectl get events --namespace "$K8S_NAMESPACE" \
      --field-selector involvedObject.name=myconsumer-scaledjob,reason=KEDAJobsCreated
    [ "$created" -ge 10 ] || die "KEDA created $created jobs, expected at least 10 (one per 10 messages)"
    echo "KEDA created $created jobs; queue $SB_QUEUE_NAME drained"
  else
    echo "queue $SB_QUEUE_NAME drained"
  fi
}

render() {
  IMAGE=${IMAGE:-<IMAGE>}
  render_settings
  kubectl kustomize "$work/k8s/$overlay"
}

down() {
  step "Clean up resources"
  if $dry_run || [ "$(az group exists --name "$RG_NAME")" = true ]; then
    run az group delete --name "$RG_NAME" --yes --no-wait
  else
    echo "resource group $RG_NAME does not exist; nothing to delete"
  fi
  # az aks get-credentials added this context to ~/.kube/config.
  if $dry_run || exists kubectl config get-contexts "$AKS_NAME"; then
    run kubectl config delete-context "$AKS_NAME"
  fi
}

if ! $dry_run && [ "$action" != render ]; then
  command -v az >/dev/null || die "the Azure CLI (az) is not installed"
  command -v kubectl >/dev/null || die "kubectl is not installed (az aks install-cli)"
fi
echo "# variant: $variant (k8s/$overlay), action: $action$($dry_run && echo ', dry run: nothing is executed')" >&2
"$action"
