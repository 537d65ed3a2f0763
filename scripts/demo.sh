#!/usr/bin/env bash
# The AKS tutorial "Securely scale your applications using the KEDA add-on and workload identity",
# replayed on this machine with no Docker and no Azure:
#
#   1. build the workspace (debug by default: the quickest first run; --release for an optimised one);
#   2. start sblocal: the local Service Bus (AMQP over TLS, the ATOM management endpoint) and the
#      Entra token endpoint, which mints the workload-identity token file (DIR/workload.env is what
#      the workload-identity webhook would inject into a pod);
#   3. run the producer Job (OPERATION_MODE=producer, MESSAGE_COUNT=100);
#   4. start the scaler (OPERATION_MODE=scaler): our KEDA external scaler reporting the queue depth;
#   5. run kedasim, KEDA's ScaledJob loop: it polls the scaler over gRPC like KEDA does and starts one
#      consumer Job (OPERATION_MODE=consumer, MESSAGE_COUNT=10) per 10 queued messages, until the
#      trigger is inactive and every Job has finished;
#   6. check the outcome: one Job per 10 messages, the queue empty, and the consumers together
#      received every message the producer sent, exactly once (read from their logs).
#
# Every process gets its own metrics port (picked by the OS); everything started here is stopped on
# exit, Ctrl-C or SIGTERM. Logs and sblocal's files are kept under .demo/ (or --dir).
# Exit status: 0 when every check passed, 1 when a stage or a check failed, 2 for bad options,
# 130/143 when interrupted (with --keep-running, Ctrl-C after the checks passed exits 0).
# Needs bash 4.4+, a Rust toolchain and the usual coreutils; curl is used when present.
#
# Usage: scripts/demo.sh [options]
#   -n, --messages N          messages the producer sends (default 100; env DEMO_MESSAGE_COUNT)
#       --release             build and run the release profile (env DEMO_RELEASE=1)
#   -k, --keep-running        after the checks, keep the broker, scaler and ScaledJob loop running
#                             until Ctrl-C, to send more messages yourself (env DEMO_KEEP_RUNNING=1)
#       --no-build            use the binaries already built (env DEMO_NO_BUILD=1)
#       --least-privilege     one identity per role, as k8s/overlays/external-scaler deploys them:
#                             servicebusdemo-producer (Data Sender), servicebusdemo-consumer (Data
#                             Receiver), servicebusdemo-scaler (Data Owner, for the management
#                             endpoint), each with its own federated token file (valid one hour);
#                             default: the tutorial's single servicebusdemo identity (Data Owner)
#                             (env DEMO_LEAST_PRIVILEGE=1)
#       --dir DIR             state directory (default .demo/run-<time>, the last 5 runs are
#                             kept; env DEMO_DIR)
#       --polling-interval D  KEDA pollingInterval (default 2s; env DEMO_POLLING_INTERVAL)
#       --processing-delay D  time each consumer spends per message (default 100ms;
#                             env DEMO_PROCESSING_DELAY)
#       --timeout D           give up when the queue has not drained after D (default 5m;
#                             env DEMO_TIMEOUT)
#   -h, --help                this text
set -Eeuo pipefail

if [ "${BASH_VERSINFO[0]}" -lt 4 ] || { [ "${BASH_VERSINFO[0]}" -eq 4 ] && [ "${BASH_VERSINFO[1]}" -lt 4 ]; }; then
  echo "demo: needs bash 4.4 or newer (this is $BASH_VERSION)" >&2
  exit 2
fi

readonly JOB_MESSAGE_COUNT=10 # the tutorial's ScaledJob: messageCount "10", consumer MESSAGE_COUNT=10
readonly SCALED_JOB=servicebusdemo-consumer

usage() {
  sed -n '/^# Usage:/,/^set -/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

message_count=${DEMO_MESSAGE_COUNT:-100}
release=${DEMO_RELEASE:-}
keep_running=${DEMO_KEEP_RUNNING:-}
no_build=${DEMO_NO_BUILD:-}
least_privilege=${DEMO_LEAST_PRIVILEGE:-}
state_dir=${DEMO_DIR:-}
polling_interval=${DEMO_POLLING_INTERVAL:-2s}
processing_delay=${DEMO_PROCESSING_DELAY:-100ms}
timeout=${DEMO_TIMEOUT:-5m}

bad_usage() {
  echo "demo: $*" >&2
  echo "run 'scripts/demo.sh --help' for the options" >&2
  exit 2
}

need_value() {
  if [ $# -lt 2 ] || [ -z "$2" ]; then
    bad_usage "$1 needs a value"
  fi
}

while [ $# -gt 0 ]; do
  case $1 in
    -n | --messages) need_value "$@"; message_count=$2; shift 2 ;;
    --messages=*) message_count=${1#*=}; shift ;;
    --release) release=1; shift ;;
    -k | --keep-running) keep_running=1; shift ;;
    --no-build) no_build=1; shift ;;
    --least-privilege) least_privilege=1; shift ;;
    --dir) need_value "$@"; state_dir=$2; shift 2 ;;
    --dir=*) state_dir=${1#*=}; shift ;;
    --polling-interval) need_value "$@"; polling_interval=$2; shift 2 ;;
    --polling-interval=*) polling_interval=${1#*=}; shift ;;
    --processing-delay) need_value "$@"; processing_delay=$2; shift 2 ;;
    --processing-delay=*) processing_delay=${1#*=}; shift ;;
    --timeout) need_value "$@"; timeout=$2; shift 2 ;;
    --timeout=*) timeout=${1#*=}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) bad_usage "unknown option: $1" ;;
  esac
done

if ! [[ $message_count =~ ^[0-9]{1,6}$ ]] || [ $((10#$message_count)) -eq 0 ]; then
  bad_usage "the message count must be a whole number from 1 to 999999, got '$message_count'"
fi
# 10# keeps a count such as 0100 from being read as octal.
message_count=$((10#$message_count))
duration_re='^[0-9]+(ms|s|m)$'
for setting in "polling interval:$polling_interval" "processing delay:$processing_delay" "timeout:$timeout"; do
  [[ ${setting#*:} =~ $duration_re ]] ||
    bad_usage "the ${setting%%:*} must be a duration such as 500ms, 2s or 5m, got '${setting#*:}'"
done
[[ $polling_interval =~ ^0+(ms|s|m)$ ]] && bad_usage "the polling interval must be more than 0"
# The DEMO_* switches: 1 (or true/yes) turns one on; 0, false, no or empty leave it off.
switch() {
  case ${2,,} in
    1 | true | yes) printf 1 ;;
    0 | false | no | '') ;;
    *) bad_usage "$1 must be 1 or 0, got '$2'" ;;
  esac
}
release=$(switch DEMO_RELEASE "$release")
keep_running=$(switch DEMO_KEEP_RUNNING "$keep_running")
no_build=$(switch DEMO_NO_BUILD "$no_build")
least_privilege=$(switch DEMO_LEAST_PRIVILEGE "$least_privilege")
expected_jobs=$(((message_count + JOB_MESSAGE_COUNT - 1) / JOB_MESSAGE_COUNT))

# A relative --dir is relative to where the demo was started, not to the repository.
if [ -n "$state_dir" ] && [[ $state_dir != /* ]]; then
  state_dir=$PWD/$state_dir
fi
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"

# --- output --------------------------------------------------------------------------------------

if [ -t 1 ]; then
  bold=$'\e[1m' dim=$'\e[2m' red=$'\e[31m' green=$'\e[32m' reset=$'\e[0m'
else
  bold='' dim='' red='' green='' reset=''
fi
started_at=$SECONDS

stage() { printf '\n%s==> %s%s\n' "$bold" "$*" "$reset"; }
say() { printf '    %s\n' "$*"; }
quote() { printf '    %s| %s%s\n' "$dim" "$*" "$reset"; }
# quote_lines [MAX]: quote stdin's non-empty lines (at most MAX); never fails, even on no input.
quote_lines() {
  local max=${1:-0} count=0 line
  while IFS= read -r line; do
    [ -z "$line" ] || { quote "$line"; count=$((count + 1)); }
    if [ "$max" -gt 0 ] && [ "$count" -ge "$max" ]; then
      cat >/dev/null
      break
    fi
  done
  return 0
}

# Stop with a clear message; `log` (optional) is the file whose tail explains the failure.
fail() {
  local message=$1 log=${2:-}
  printf '\n%sdemo failed: %s%s\n' "$red" "$message" "$reset" >&2
  if [ -n "$log" ] && [ -s "$log" ]; then
    printf '    last lines of %s:\n' "$log" >&2
    tail -n 15 "$log" | sed 's/^/    | /' >&2
  fi
  if [ -n "${state_dir:-}" ] && [ -d "$state_dir" ]; then
    printf '    logs: %s\n' "$state_dir" >&2
  fi
  exit 1
}

# --- processes -----------------------------------------------------------------------------------

# Everything started in the background, as "pid:name". With setsid each one leads its own process
# group, so stopping kedasim's group also stops the consumer Jobs it spawned.
started=()
have_setsid=
command -v setsid >/dev/null 2>&1 && have_setsid=1

# start NAME LOG COMMAND...: run COMMAND in the background with stdout and stderr in LOG.
start() {
  local name=$1 log=$2
  shift 2
  # Created here, not by the background job's redirection: readers may look before it runs.
  : >"$log"
  if [ -n "$have_setsid" ]; then
    setsid "$@" >"$log" 2>&1 </dev/null &
  else
    "$@" >"$log" 2>&1 </dev/null &
  fi
  last_pid=$!
  started+=("$last_pid:$name")
}

alive() { kill -0 "$1" 2>/dev/null; }

# Drop a process that has been waited for, so cleanup never signals a reused pid.
forget() {
  local index
  for index in "${!started[@]}"; do
    [ "${started[index]%%:*}" = "$1" ] && unset 'started[index]'
  done
  started=("${started[@]}")
}

# Signal a started process: its whole group when it leads one, else the process alone.
signal() {
  local sig=$1 pid=$2
  if [ -n "$have_setsid" ] && kill "-$sig" -- "-$pid" 2>/dev/null; then
    return 0
  fi
  kill "-$sig" "$pid" 2>/dev/null || true
}

# True while the process (or anything left in its group) still runs.
group_alive() {
  if [ -n "$have_setsid" ]; then
    kill -0 -- "-$1" 2>/dev/null
  else
    kill -0 "$1" 2>/dev/null
  fi
}

# Stop one started process: SIGTERM (the binaries shut down cleanly on it), SIGKILL after 10s.
stop_process() {
  local pid=$1 name=$2 waited=0
  group_alive "$pid" || { wait "$pid" 2>/dev/null || true; return 0; }
  signal TERM "$pid"
  while group_alive "$pid" && [ "$waited" -lt 100 ]; do
    sleep 0.1
    waited=$((waited + 1))
  done
  if group_alive "$pid"; then
    say "$name did not stop within 10s; killing it"
    signal KILL "$pid"
  fi
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local status=$?
  trap - EXIT HUP INT TERM ERR
  local index entry
  # Newest first: the ScaledJob loop and its Jobs, then the scaler, then the broker.
  for ((index = ${#started[@]} - 1; index >= 0; index--)); do
    entry=${started[index]}
    stop_process "${entry%%:*}" "${entry#*:}"
  done
  if [ ${#started[@]} -gt 0 ]; then
    printf '\n%sstopped everything the demo started%s\n' "$dim" "$reset"
  fi
  exit "$status"
}
# Anything that fails unexpectedly (set -e) still ends with a message naming the command.
on_error() {
  local status=$? line=$1 command=$2
  # Command substitutions run in subshells and inherit this trap (set -E); report once, from the top.
  [ "$BASHPID" = "$$" ] || return "$status"
  fail "unexpected failure (status $status) at scripts/demo.sh line $line: $command"
}
trap cleanup EXIT
trap 'on_error "$LINENO" "$BASH_COMMAND"' ERR
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM

# wait_for_line FILE REGEX SECONDS PID WHAT: wait until FILE has a line matching REGEX (extended).
wait_for_line() {
  local file=$1 regex=$2 seconds=$3 pid=$4 what=$5 tries=0
  until grep -Eq -- "$regex" "$file" 2>/dev/null; do
    alive "$pid" || fail "$what exited before it was ready" "$file"
    tries=$((tries + 1))
    [ "$tries" -le $((seconds * 10)) ] || fail "$what not ready after ${seconds}s" "$file"
    sleep 0.1
  done
}

# The first value of a `key=value` field in a log, e.g. `metrics_addr=127.0.0.1:4321`.
log_field() {
  { grep -Eo -- "(^|[[:space:]])$2=[^[:space:]]+" "$1" || true; } |
    head -n 1 | sed 's/^[[:space:]]*[^=]*=//; s/^"//; s/"$//'
}

# GET an http:// URL; curl when present, else bash's /dev/tcp (HTTP/1.0, so the server closes).
http_get() {
  local url=$1
  if command -v curl >/dev/null 2>&1; then
    curl -fsS --max-time 5 "$url"
    return
  fi
  local rest=${url#http://}
  local authority=${rest%%/*} path=/${rest#*/}
  local host=${authority%:*} port=${authority##*:}
  exec 3<>"/dev/tcp/$host/$port" || return 1
  printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$path" "$authority" >&3
  sed '1,/^\r\{0,1\}$/d' <&3
  exec 3<&-
}

# A metric's value (first sample whose line starts with PATTERN) from a /metrics page.
metric_value() {
  awk -v pattern="$2" 'index($0, pattern) == 1 { print $NF; exit }' <<<"$1"
}

# --- 1. build ------------------------------------------------------------------------------------

if [ -n "$release" ]; then
  profile=release cargo_profile=(--release) profile_note="optimised"
else
  profile=debug cargo_profile=() profile_note="the quickest build; --release for an optimised one"
fi
target_dir=${CARGO_TARGET_DIR:-$repo_root/target}
bin_dir=$target_dir/$profile

if [ -n "$no_build" ]; then
  stage "Using the $profile binaries in $bin_dir (--no-build)"
else
  stage "Building the workspace ($profile profile: $profile_note)"
  command -v cargo >/dev/null 2>&1 || fail "cargo not found: install a Rust toolchain (https://rustup.rs)"
  build_started=$SECONDS
  cargo build --workspace --bins "${cargo_profile[@]}" ||
    fail "cargo build failed (see the compiler output above)"
  say "built in $((SECONDS - build_started))s"
fi
for binary in sblocal servicebusdemo kedasim; do
  [ -x "$bin_dir/$binary" ] || fail "$bin_dir/$binary is missing: build it first (drop --no-build)"
done

if [ -z "$state_dir" ]; then
  state_dir=$repo_root/.demo/run-$(date -u +%Y%m%dT%H%M%SZ)-$$
  # Keep the logs of the last few runs only.
  old_runs=()
  for run in "$repo_root"/.demo/run-*; do
    [ -d "$run" ] && old_runs+=("$run")
  done
  for ((index = 0; index + 4 < ${#old_runs[@]}; index++)); do
    rm -rf -- "${old_runs[index]}"
  done
fi
mkdir -p "$state_dir/sblocal" "$state_dir/jobs" || fail "cannot create the state directory $state_dir"
state_dir=$(cd "$state_dir" && pwd)
broker_dir=$state_dir/sblocal
jobs_dir=$state_dir/jobs
# A reused --dir: Jobs of an earlier run must not be counted as this run's.
rm -f "$jobs_dir/$SCALED_JOB"-*.log
if [[ $state_dir == "$repo_root/.demo/"* ]]; then
  ln -sfn "$state_dir" "$repo_root/.demo/latest"
fi

# Our processes read their settings from the environment: settings the caller happens to have
# exported (a real namespace's connection string, a log filter, a mode) must not leak into the demo.
unset OPERATION_MODE MESSAGE_COUNT MESSAGE_BODY MESSAGE_SIZE PROCESSING_DELAY CONSUMER_IDLE_TIMEOUT \
  PREFETCH MAX_PROCESSING_ATTEMPTS PROCESSING_FAIL_MATCH OPERATION_TIMEOUT RETRY_MAX_ATTEMPTS \
  RETRY_BASE_DELAY RETRY_MAX_DELAY METRICS_ADDR SCALER_GRPC_ADDR SCALER_CACHE_TTL SCALER_MAX_STALENESS \
  SCALER_QUEUES SCALER_TLS_CERT_FILE SCALER_TLS_KEY_FILE SCALER_TLS_CLIENT_CA_FILE \
  AZURE_SERVICEBUS_CONNECTION_STRING AZURE_SERVICEBUS_HOSTNAME AZURE_SERVICEBUS_QUEUE_NAME \
  AZURE_SERVICEBUS_MANAGEMENT_ENDPOINT AZURE_CLIENT_ID AZURE_TENANT_ID AZURE_FEDERATED_TOKEN_FILE \
  AZURE_AUTHORITY_HOST AZURE_CLIENT_SECRET AZURE_CLIENT_CERTIFICATE_PATH IDENTITY_ENDPOINT \
  OTEL_EXPORTER_OTLP_ENDPOINT KEDASIM_SCALER_ADDRESS
# Text logs at info level: the lines shown below (and the bound addresses) are read from them.
export LOG_FORMAT=text RUST_LOG=info

# --- 2. sblocal ----------------------------------------------------------------------------------

stage "Starting sblocal: the local Service Bus with its Entra token endpoint"
broker_log=$state_dir/sblocal.log
start sblocal "$broker_log" "$bin_dir/sblocal" serve --dir "$broker_dir" \
  --amqp 127.0.0.1:0 --amqps 127.0.0.1:0 --http 127.0.0.1:0 --https 127.0.0.1:0
broker_pid=$last_pid
wait_for_line "$broker_log" '^ready$' 30 "$broker_pid" "sblocal"
[ -s "$broker_dir/workload.env" ] || fail "sblocal printed ready but wrote no workload.env" "$broker_log"

# workload.env holds unquoted KEY=VALUE lines: exactly what the workload-identity webhook (and the
# tutorial's Job spec) give a pod. Keep them as the Job template's environment.
workload_env=()
while IFS= read -r line || [ -n "$line" ]; do
  [[ $line =~ ^[A-Z_][A-Z0-9_]*= ]] && workload_env+=("$line")
done <"$broker_dir/workload.env"
env_value() {
  local entry
  for entry in "${workload_env[@]}"; do
    [ "${entry%%=*}" = "$1" ] && { printf '%s' "${entry#*=}"; return 0; }
  done
  return 1
}
for required in AZURE_SERVICEBUS_HOSTNAME AZURE_SERVICEBUS_QUEUE_NAME AZURE_CLIENT_ID AZURE_TENANT_ID \
  AZURE_AUTHORITY_HOST AZURE_FEDERATED_TOKEN_FILE; do
  env_value "$required" >/dev/null || fail "workload.env has no $required" "$broker_dir/workload.env"
done
queue=$(env_value AZURE_SERVICEBUS_QUEUE_NAME)
token_file=$(env_value AZURE_FEDERATED_TOKEN_FILE)
[ -s "$token_file" ] || fail "the federated token file $token_file is missing or empty"
say "Service Bus (AMQP over TLS):   $(env_value AZURE_SERVICEBUS_HOSTNAME), queue $queue"
say "Entra token endpoint:          $(env_value AZURE_AUTHORITY_HOST)"
say "management (ATOM) endpoint:    $(env_value AZURE_SERVICEBUS_MANAGEMENT_ENDPOINT || echo '-')"

# The client id of an identity in sblocal's identities.json (jq when present; else the file's
# pretty-printed layout, where each identity's "name" is followed by its "client_id").
client_id_of() {
  local file=$broker_dir/identities.json
  if command -v jq >/dev/null 2>&1; then
    jq -r --arg name "$1" '.identities[] | select(.name == $name) | .client_id' "$file"
  else
    tr -d '\n' <"$file" | { grep -Eo "\"name\": *\"$1\", *\"client_id\": *\"[^\"]+\"" || true; } |
      sed -E 's/.*"client_id": *"([^"]+)"/\1/'
  fi
}

# The environment of each role's pods: workload.env as is (the tutorial: one identity for all), or
# with the role's own client id and federated token file (--least-privilege).
declare -A role_client_id=() role_token_file=()
for role in producer consumer scaler; do
  if [ -n "$least_privilege" ]; then
    identity=servicebusdemo-$role
    role_client_id[$role]=$(client_id_of "$identity")
    [ -n "${role_client_id[$role]}" ] ||
      fail "sblocal's identities.json has no client id for $identity" "$broker_dir/identities.json"
    role_token_file[$role]=$broker_dir/token-$identity
    # What the kubelet projects into the pod of service account default/$identity.
    (umask 077 && "$bin_dir/sblocal" token --dir "$broker_dir" \
      --sub "system:serviceaccount:default:$identity" >"${role_token_file[$role]}") ||
      fail "sblocal token could not mint a token for $identity"
    say "$(printf '%-31s' "$role identity:")$identity, client id ${role_client_id[$role]}"
  else
    role_client_id[$role]=$(env_value AZURE_CLIENT_ID)
    role_token_file[$role]=$token_file
  fi
done
if [ -z "$least_privilege" ]; then
  say "workload identity:             servicebusdemo, client id $(env_value AZURE_CLIENT_ID) (all roles)"
  say "federated token file:          $token_file"
fi
say "(the pod environment the webhook would inject: $broker_dir/workload.env)"

# role_env ROLE: print the role's environment, one KEY=VALUE per line.
role_env() {
  local entry
  for entry in "${workload_env[@]}"; do
    case ${entry%%=*} in
      AZURE_CLIENT_ID) printf 'AZURE_CLIENT_ID=%s\n' "${role_client_id[$1]}" ;;
      AZURE_FEDERATED_TOKEN_FILE) printf 'AZURE_FEDERATED_TOKEN_FILE=%s\n' "${role_token_file[$1]}" ;;
      *) printf '%s\n' "$entry" ;;
    esac
  done
}

# run_workload ROLE LOG COMMAND...: COMMAND with the role's environment, in the background.
run_workload() {
  local role=$1 log=$2 entries
  shift 2
  mapfile -t entries < <(role_env "$role")
  start "$role" "$log" env "${entries[@]}" "$@"
}

# --- 3. producer ---------------------------------------------------------------------------------

stage "Producer Job: OPERATION_MODE=producer MESSAGE_COUNT=$message_count"
producer_log=$state_dir/producer.log
run_workload producer "$producer_log" OPERATION_MODE=producer MESSAGE_COUNT="$message_count" \
  METRICS_ADDR=127.0.0.1:0 "$bin_dir/servicebusdemo"
producer_pid=$last_pid
producer_status=0
wait "$producer_pid" || producer_status=$?
forget "$producer_pid"
{ grep -E 'credential chosen|metrics_addr=|Sent [0-9]+ messages' "$producer_log" || true; } |
  sed -E 's/^[^ ]+ +//' | quote_lines
[ "$producer_status" -eq 0 ] || fail "the producer exited with status $producer_status" "$producer_log"
sent=$(grep -Eo 'Sent [0-9]+ messages' "$producer_log" | tail -n 1 | grep -Eo '[0-9]+' || true)
[ "${sent:-0}" -eq "$message_count" ] ||
  fail "the producer reports ${sent:-no} messages sent, $message_count were asked for" "$producer_log"

# --- 4. scaler -----------------------------------------------------------------------------------

stage "Scaler: OPERATION_MODE=scaler (the KEDA external scaler, gRPC)"
scaler_log=$state_dir/scaler.log
# A cache TTL well under the polling interval: KEDA must not act on a count from before the last
# Jobs finished (that would start a Job for messages already consumed).
run_workload scaler "$scaler_log" OPERATION_MODE=scaler SCALER_GRPC_ADDR=127.0.0.1:0 \
  SCALER_CACHE_TTL=250ms METRICS_ADDR=127.0.0.1:0 "$bin_dir/servicebusdemo"
scaler_pid=$last_pid
wait_for_line "$scaler_log" 'metrics_addr=' 30 "$scaler_pid" "the scaler"
wait_for_line "$scaler_log" 'grpc_addr=' 30 "$scaler_pid" "the scaler's gRPC server"
scaler_metrics=http://$(log_field "$scaler_log" metrics_addr)/metrics
scaler_grpc=$(log_field "$scaler_log" grpc_addr)
[ -n "$scaler_grpc" ] || fail "cannot read the scaler's gRPC address from its log" "$scaler_log"
say "gRPC (scalerAddress):          $scaler_grpc"
say "metrics:                       $scaler_metrics"

# The queue depth, as the scaler's gauge shows it once its first poll of the queue is done.
active_gauge="servicebusdemo_queue_active_messages{queue=\"$queue\"}"
dead_letter_gauge="servicebusdemo_queue_dead_letter_messages{queue=\"$queue\"}"
queue_depth=
for _ in $(seq 1 100); do
  page=$(http_get "$scaler_metrics" 2>/dev/null || true)
  queue_depth=$(metric_value "$page" "$active_gauge")
  [ -n "$queue_depth" ] && break
  alive "$scaler_pid" || fail "the scaler exited" "$scaler_log"
  sleep 0.1
done
[ -n "$queue_depth" ] || fail "the scaler's /metrics has no $active_gauge after 10s" "$scaler_log"
say "queue depth:                   $queue_depth active messages ($active_gauge)"

# --- 5. the ScaledJob loop -----------------------------------------------------------------------

stage "ScaledJob $SCALED_JOB: kedasim plays KEDA (pollingInterval $polling_interval, messageCount $JOB_MESSAGE_COUNT)"
say "each Job: OPERATION_MODE=consumer MESSAGE_COUNT=$JOB_MESSAGE_COUNT PROCESSING_DELAY=$processing_delay"
kedasim_log=$state_dir/kedasim.log
# The consumer's default idle timeout (30s): a Job that finds the queue empty before it has its 10
# messages (the last Job when the count is not a multiple of 10) waits that long before it exits.
job_env=(--env OPERATION_MODE=consumer --env "MESSAGE_COUNT=$JOB_MESSAGE_COUNT"
  --env "PROCESSING_DELAY=$processing_delay" --env METRICS_ADDR=127.0.0.1:0
  --env CONSUMER_IDLE_TIMEOUT=30s)
mapfile -t consumer_env < <(role_env consumer)
for entry in "${consumer_env[@]}"; do
  job_env+=(--env "$entry")
done
# kedasim_command EXTRA_ARGS...: the ScaledJob, as kedasim arguments.
kedasim_command() {
  printf '%s\0' "$bin_dir/kedasim" --scaler-address "$scaler_grpc" --name "$SCALED_JOB" \
    --metadata "queueName=$queue" --metadata "messageCount=$JOB_MESSAGE_COUNT" \
    --polling-interval "$polling_interval" --log-dir "$jobs_dir" "${job_env[@]}" "$@" \
    -- "$bin_dir/servicebusdemo"
}
mapfile -d '' -t kedasim_args < <(kedasim_command --until-inactive --timeout "$timeout")
loop_started=$SECONDS
start kedasim "$kedasim_log" "${kedasim_args[@]}"
kedasim_pid=$last_pid

# Follow kedasim's output (its polls and KEDA's events) while it runs; scrape one running Job's
# /metrics on the way, as one would port-forward to a pod.
shown=0
job_metrics_page=
job_metrics_name=
# show_new_lines [FILTER]: print kedasim's lines not shown yet, minus those matching FILTER (ERE).
show_new_lines() {
  local total filter=${1:-}
  total=$(wc -l <"$kedasim_log")
  if [ "$total" -gt "$shown" ]; then
    sed -n "$((shown + 1)),${total}p" "$kedasim_log" |
      { if [ -n "$filter" ]; then grep -Ev -- "$filter" || true; else cat; fi; } | quote_lines
    shown=$total
  fi
}
# Keeps the latest page, so what is shown is close to the Job's final numbers.
scrape_a_running_job() {
  local log address page
  for log in "$jobs_dir/$SCALED_JOB"-*.log; do
    [ -e "$log" ] || return 0
    grep -q 'consumer finished' "$log" && continue
    address=$(log_field "$log" metrics_addr)
    [ -n "$address" ] || continue
    page=$(http_get "http://$address/metrics" 2>/dev/null) || continue
    if grep -q '^servicebusdemo_messages_received_total' <<<"$page"; then
      job_metrics_page=$page
      job_metrics_name="$(basename "$log" .log) at http://$address/metrics"
      return 0
    fi
  done
  return 0
}
while alive "$kedasim_pid"; do
  show_new_lines
  scrape_a_running_job
  sleep 0.2
done
kedasim_status=0
wait "$kedasim_pid" || kedasim_status=$?
# Jobs run in kedasim's process group; any left behind would be stopped with it at exit.
group_alive "$kedasim_pid" || forget "$kedasim_pid"
show_new_lines
loop_seconds=$((SECONDS - loop_started))
if [ "$kedasim_status" -ne 0 ]; then
  failed_job=$(grep -Eo 'Job [^ ]+ failed' "$kedasim_log" | head -n 1 | cut -d' ' -f2 || true)
  if [ -n "$failed_job" ]; then
    fail "consumer Job $failed_job failed (kedasim exited with status $kedasim_status)" "$jobs_dir/$failed_job.log"
  elif grep -q KEDASimTimeout "$kedasim_log"; then
    scaler_errors=$(grep -c KEDAScalerFailed "$kedasim_log" || true)
    fail "the queue did not drain within $timeout ($scaler_errors failed scaler polls; scaler log: $scaler_log)" "$kedasim_log"
  else
    fail "kedasim exited with status $kedasim_status" "$kedasim_log"
  fi
fi

# --- 6. what happened ----------------------------------------------------------------------------

stage "Jobs (logs in $jobs_dir)"
job_logs=("$jobs_dir/$SCALED_JOB"-*.log)
[ -e "${job_logs[0]}" ] || fail "kedasim created no Job" "$kedasim_log"
received_total=0
completed_total=0
short_jobs=()
all_ids=$state_dir/received-message-ids
: >"$all_ids"
for log in "${job_logs[@]}"; do
  received=$(grep -c 'Received message:' "$log" || true)
  completed=$(grep 'consumer finished' "$log" | grep -Eo 'completed=[0-9]+' | head -n 1 | cut -d= -f2 || true)
  first_body=$(grep -m 1 'Received message:' "$log" | sed -E 's/.*Received message: //; s/ message_id=.*//' || true)
  stop_reason=$(grep 'consumer finished' "$log" | grep -Eo 'reason=[A-Za-z]+' | head -n 1 | cut -d= -f2 || true)
  say "$(basename "$log" .log): received $received, completed ${completed:-?}${first_body:+  (first: $first_body)}"
  if [ "$received" -lt "$JOB_MESSAGE_COUNT" ] && [ "$stop_reason" = Idle ]; then
    short_jobs+=("$(basename "$log" .log) received $received of $JOB_MESSAGE_COUNT, then waited its idle timeout")
  fi
  received_total=$((received_total + received))
  completed_total=$((completed_total + ${completed:-0}))
  grep 'Received message:' "$log" | grep -Eo 'message_id=[^ ]+' >>"$all_ids" || true
done
distinct_ids=$(sort -u "$all_ids" | grep -c . || true)
jobs_created=${#job_logs[@]}

# After the last Job, the scaler's gauges must come down to 0 within a few of its refreshes.
final_depth=
dead_letters=
page=
for _ in $(seq 1 50); do
  page=$(http_get "$scaler_metrics" 2>/dev/null || true)
  final_depth=$(metric_value "$page" "$active_gauge")
  dead_letters=$(metric_value "$page" "$dead_letter_gauge")
  [ "$final_depth" = 0 ] && break
  sleep 0.1
done

stage "Metrics"
say "scaler ($scaler_metrics):"
{ grep -E "^servicebusdemo_(queue_active_messages|queue_dead_letter_messages|management_requests_total|token_requests_total)" <<<"$page" || true; } |
  quote_lines 8
if [ -n "$job_metrics_page" ]; then
  say "a consumer Job while it ran ($job_metrics_name):"
  { grep -E '^servicebusdemo_(messages_received_total|messages_settled_total|processing_duration_seconds_count)' <<<"$job_metrics_page" || true; } |
    quote_lines 6
fi

stage "Checks"
passed=0
failed=0
check() {
  local description=$1
  shift
  if "$@"; then
    passed=$((passed + 1))
    printf '    %sok%s    %s\n' "$green" "$reset" "$description"
  else
    failed=$((failed + 1))
    printf '    %sFAIL%s  %s\n' "$red" "$reset" "$description"
  fi
}
equals() { [ "$1" = "$2" ]; }
check "the producer sent $message_count messages (sent: $sent)" equals "$sent" "$message_count"
check "KEDA's loop created $expected_jobs Jobs, one per $JOB_MESSAGE_COUNT messages (created: $jobs_created)" \
  equals "$jobs_created" "$expected_jobs"
check "the queue ended empty (active messages: ${final_depth:-unknown}, dead-lettered: ${dead_letters:-unknown})" \
  equals "${final_depth:-x}:${dead_letters:-x}" "0:0"
check "the Jobs received every message exactly once (received: $received_total, distinct: $distinct_ids, completed: $completed_total)" \
  equals "$received_total:$distinct_ids:$completed_total" "$sent:$sent:$sent"
echo "checks: $passed passed, $failed failed"
if [ "$jobs_created" -gt "$expected_jobs" ]; then
  say "more Jobs than needed: KEDA's default strategy starts ceil(queue/$JOB_MESSAGE_COUNT) minus the running"
  say "Jobs, so a count read before a Job finished, or a Job that took fewer than $JOB_MESSAGE_COUNT messages,"
  say "makes it start another one (polls: $kedasim_log)"
  if [ ${#short_jobs[@]} -gt 0 ]; then
    say "Jobs that got fewer messages than they asked for:"
    for entry in "${short_jobs[@]}"; do
      say "  $entry"
    done
  fi
fi
[ "$failed" -eq 0 ] || fail "$failed check(s) failed"

printf '\n%sThe tutorial ran end to end%s: %s messages, %s Jobs, the queue drained in %ss (%ss in all).\n' \
  "$green" "$reset" "$sent" "$jobs_created" "$loop_seconds" "$((SECONDS - started_at))"
say "logs and sblocal's files: $state_dir"

# --- keep running --------------------------------------------------------------------------------

if [ -n "$keep_running" ]; then
  stage "Keeping the broker, the scaler and the ScaledJob loop running (Ctrl-C stops everything)"
  # Ctrl-C is how this mode ends; the checks have passed already.
  trap 'exit 0' HUP INT TERM
  jobs_dir=$state_dir/jobs-continuous
  mkdir -p "$jobs_dir"
  rm -f "$jobs_dir/$SCALED_JOB"-*.log
  mapfile -d '' -t kedasim_args < <(kedasim_command)
  kedasim_log=$state_dir/kedasim-continuous.log
  shown=0
  start kedasim "$kedasim_log" "${kedasim_args[@]}"
  kedasim_pid=$last_pid
  say "send more messages from another terminal, and watch Jobs being created here:"
  say "  (while IFS= read -r line; do export \"\$line\"; done < '$broker_dir/workload.env'"
  say "   OPERATION_MODE=producer MESSAGE_COUNT=50 METRICS_ADDR=127.0.0.1:0 '$bin_dir/servicebusdemo')"
  say "scaler: gRPC $scaler_grpc, metrics $scaler_metrics"
  say "ScaledJob log: $kedasim_log; Job logs: $jobs_dir"
  while alive "$scaler_pid" && alive "$broker_pid" && alive "$kedasim_pid"; do
    # Polls that change nothing would scroll everything else away.
    show_new_lines 'create 0$'
    sleep 0.5
  done
  show_new_lines 'create 0$'
  fail "the scaler, sblocal or kedasim stopped on its own" "$kedasim_log"
fi
