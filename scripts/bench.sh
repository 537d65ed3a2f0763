#!/usr/bin/env bash
# Benchmarks servicebusdemo against the local Service Bus (sblocal), in one run, and prints one
# markdown table: ours vs the official Python SDK (azure-servicebus) vs the broker's raw ceiling
# (a bare fe2o3-amqp client, examples/raw_ceiling.rs).
#
# Measured: producer throughput (1 KB bodies), consumer receive+complete throughput at two
# prefetch settings, cold start with the workload-identity token exchange, peak RSS, release
# binary size, and the scaler's GetMetrics latency from cache under concurrent callers.
# Numbers are printed, never asserted: they depend on the machine and its load.
#
# Settings (environment):
#   BENCH_QUICK=1              small counts (finishes in well under two minutes once built)
#   BENCH_PRODUCER_COUNTS      messages per producer run      (default "10000 100000"; quick "2000 10000")
#   BENCH_CONSUMER_COUNT       messages per consumer run      (default 10000; quick 2000)
#   BENCH_PREFETCHES           consumer prefetch settings     (default "0 100")
#   BENCH_ONE_CPU=0            skip the prefetch-0 rerun with broker and clients on one CPU
#   BENCH_MESSAGE_SIZE         body bytes                     (default 1024)
#   BENCH_REPEATS              throughput runs, median shown  (default 3; quick 1)
#   BENCH_COLD_RUNS            cold-start runs, median shown  (default 5; quick 3)
#   BENCH_SCALER_CALLERS       concurrent GetMetrics callers  (default 1000)
#   BENCH_SCALER_WAVES         waves of callers               (default 5; quick 2)
#   BENCH_PYTHON               Python with azure-servicebus   (default .venv/bin/python)
#   BENCH_SKIP_BUILD=1         use the release binaries already built
#   BENCH_KEEP=1               keep the work directory (logs) and print its path
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HELPERS="$ROOT/scripts/bench"

if [[ "${BENCH_QUICK:-0}" == 1 ]]; then
    default_producer_counts="2000 10000"
    default_consumer_count=2000
    default_cold_runs=3
    default_repeats=1
    default_waves=2
else
    default_producer_counts="10000 100000"
    default_consumer_count=10000
    default_cold_runs=5
    default_repeats=3
    default_waves=5
fi
PRODUCER_COUNTS=${BENCH_PRODUCER_COUNTS:-$default_producer_counts}
CONSUMER_COUNT=${BENCH_CONSUMER_COUNT:-$default_consumer_count}
read -ra prefetch_list <<<"${BENCH_PREFETCHES:-0 100}"
PREFETCHES=${prefetch_list[*]}
LAST_PREFETCH=""
((${#prefetch_list[@]})) && LAST_PREFETCH=${prefetch_list[${#prefetch_list[@]} - 1]}
SIZE=${BENCH_MESSAGE_SIZE:-1024}
COLD_RUNS=${BENCH_COLD_RUNS:-$default_cold_runs}
REPEATS=${BENCH_REPEATS:-$default_repeats}
SCALER_CALLERS=${BENCH_SCALER_CALLERS:-1000}
SCALER_WAVES=${BENCH_SCALER_WAVES:-$default_waves}
PYTHON=${BENCH_PYTHON:-$ROOT/.venv/bin/python}
QUEUE=bench
RAW_CREDIT=1000

die() {
    echo "bench: $*" >&2
    exit 1
}

for number in "$CONSUMER_COUNT" "$SIZE" "$COLD_RUNS" "$REPEATS" "$SCALER_CALLERS" "$SCALER_WAVES" $PRODUCER_COUNTS $PREFETCHES; do
    [[ "$number" =~ ^[0-9]+$ ]] || die "not a number: $number (check the BENCH_* settings)"
done
[[ -n "$LAST_PREFETCH" ]] || die "BENCH_PREFETCHES names no prefetch setting"
[[ -x "$PYTHON" ]] || die "no Python at $PYTHON (set BENCH_PYTHON)"
"$PYTHON" -c 'import azure.servicebus' 2>/dev/null || die "$PYTHON lacks azure-servicebus"
[[ -x /usr/bin/time ]] || die "/usr/bin/time is missing (apt-get install time)"

if [[ "${BENCH_SKIP_BUILD:-0}" != 1 ]]; then
    echo "building release binaries..." >&2
    (cd "$ROOT" && cargo build --release --quiet -p sblocal &&
        cargo build --release --quiet -p servicebusdemo --bins --example raw_ceiling --example scaler_load)
fi
RELEASE="$ROOT/target/release"
OURS="$RELEASE/servicebusdemo"
SBLOCAL="$RELEASE/sblocal"
RAW="$RELEASE/examples/raw_ceiling"
LOAD="$RELEASE/examples/scaler_load"
for binary in "$OURS" "$SBLOCAL" "$RAW" "$LOAD"; do
    [[ -x "$binary" ]] || die "$binary is missing (run without BENCH_SKIP_BUILD)"
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/bench.XXXXXX")
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ "${BENCH_KEEP:-0}" == 1 ]]; then
        echo "bench: logs kept in $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

# --- the broker -----------------------------------------------------------------------------
cat >"$WORK/Config.json" <<EOF
{"UserConfig":{"Namespaces":[{"Name":"sbemulatorns","Queues":[
  {"Name":"$QUEUE","Properties":{"LockDuration":"PT5M","MaxDeliveryCount":10,"DefaultMessageTimeToLive":"PT1H"}}
]}],"Logging":{"Type":"Console"}}}
EOF
BROKER="$WORK/broker"
RUST_LOG=warn "$SBLOCAL" serve --dir "$BROKER" --config "$WORK/Config.json" \
    --amqp 127.0.0.1:0 --amqps 127.0.0.1:0 --http 127.0.0.1:0 --https 127.0.0.1:0 \
    >"$WORK/sblocal.out" 2>"$WORK/sblocal.err" &
PIDS+=("$!")
for _ in $(seq 1 300); do
    grep -q '^ready$' "$WORK/sblocal.out" 2>/dev/null && break
    sleep 0.1
done
grep -q '^ready$' "$WORK/sblocal.out" || die "sblocal did not start: $(cat "$WORK/sblocal.err")"
SAS_ENV="$BROKER/emulator.env"
WORKLOAD_ENV="$BROKER/workload.env"

# Runs a command with the KEY=VALUE lines of an env file exported (values hold ';', so they are
# exported line by line, never sourced).
with_env() {
    local file=$1
    shift
    (
        while IFS= read -r line; do
            [[ -n "$line" ]] && export "${line?}"
        done <"$file"
        export AZURE_SERVICEBUS_QUEUE_NAME="$QUEUE" METRICS_ADDR=127.0.0.1:0 LOG_FORMAT=text
        exec "$@"
    )
}

json_field() { # FILE FIELD -> the number after "FIELD":
    sed -n "s/.*\"$2\": *\([0-9.]*\).*/\1/p" "$1" | head -n 1
}
rate() { # COUNT SECONDS -> per second
    awk -v n="$1" -v s="$2" 'BEGIN { if (s > 0) printf "%.0f", n / s; else print "" }'
}
median_of() { # VALUES... -> their median
    printf '%s\n' "$@" | median
}
median() {
    sort -n | awk '{ v[NR] = $1 } END { if (NR) printf "%.1f", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
rss_mb() { # a /usr/bin/time -f %M output file (KiB) -> MiB
    awk '/^[0-9]+$/ { printf "%.1f", $1 / 1024 }' "$1"
}

declare -A R
# Prefix for the measured client commands: empty, or a taskset that puts them on the broker's CPU.
PIN=()
next_log() { # KIND -> a fresh log path prefix (functions run in $(...), so no shared counter)
    mktemp "$WORK/$1.XXXXXX"
}

raw_send() { # COUNT -> msg/s
    local log
    log=$(next_log raw-send)
    with_env "$SAS_ENV" "$RAW" send "$1" "$SIZE" 8 >"$log.out" 2>"$log.err" || die "raw send failed: $(cat "$log.err")"
    json_field "$log.out" per_second
}
raw_receive() { # COUNT CREDIT -> msg/s
    local log
    log=$(next_log raw-receive)
    with_env "$SAS_ENV" "${PIN[@]}" "$RAW" receive "$1" "$2" >"$log.out" 2>"$log.err" || die "raw receive failed: $(cat "$log.err")"
    json_field "$log.out" per_second
}
fill() { # COUNT: put messages in the queue with the raw client
    raw_send "$1" >/dev/null
}
drain() { # COUNT: take them out again
    raw_receive "$1" "$RAW_CREDIT" >/dev/null
}
python_peer() { # MODE COUNT ARG -> msg/s; RSS in $WORK/last-python.rss
    local log
    log=$(next_log "python-$1")
    with_env "$SAS_ENV" "${PIN[@]}" /usr/bin/time -f %M -o "$WORK/last-python.rss" \
        "$PYTHON" "$HELPERS/python_peer.py" "$1" "$2" "$3" >"$log.out" 2>"$log.err" ||
        die "python $1 failed: $(tail -n 5 "$log.err")"
    json_field "$log.out" per_second
}
ours_produce() { # COUNT -> msg/s (from the log: link open -> every message accepted); RSS in $WORK/last-ours.rss
    local log seconds
    log=$(next_log producer)
    with_env "$SAS_ENV" env OPERATION_MODE=producer MESSAGE_COUNT="$1" MESSAGE_SIZE="$SIZE" RUST_LOG=info \
        /usr/bin/time -f %M -o "$WORK/last-ours.rss" "$OURS" >"$log.out" 2>"$log.err" ||
        die "producer failed: $(tail -n 5 "$log.err")"
    seconds=$("$PYTHON" "$HELPERS/logspan.py" "$log.err" ' sending ' 'every message accepted')
    rate "$1" "$seconds"
}
ours_consume() { # COUNT PREFETCH -> msg/s (first message received -> finished); RSS in $WORK/last-ours.rss
    local log seconds
    log=$(next_log consumer)
    with_env "$SAS_ENV" "${PIN[@]}" env OPERATION_MODE=consumer MESSAGE_COUNT="$1" PREFETCH="$2" CONSUMER_IDLE_TIMEOUT=10s \
        RUST_LOG=info /usr/bin/time -f %M -o "$WORK/last-ours.rss" "$OURS" >"$log.out" 2>"$log.err" ||
        die "consumer failed: $(tail -n 5 "$log.err")"
    grep -q "completed=$1 " "$log.err" || die "consumer did not complete $1 messages: $(tail -n 3 "$log.err")"
    seconds=$("$PYTHON" "$HELPERS/logspan.py" "$log.err" 'Received message' 'consumer finished')
    rate "$(($1 - 1))" "$seconds"
}

# --- producer -------------------------------------------------------------------------------
# Each throughput is the median of REPEATS runs, ours and the peers interleaved, so that a
# slow moment of the machine does not decide a ratio.
for count in $PRODUCER_COUNTS; do
    echo "producer, $count messages (x$REPEATS)..." >&2
    raw_runs=() ours_runs=() batch_runs=() single_runs=()
    for _ in $(seq 1 "$REPEATS"); do
        raw_runs+=("$(raw_send "$count")")
        drain "$count"
        ours_runs+=("$(ours_produce "$count")")
        R[ours_send_rss]=$(rss_mb "$WORK/last-ours.rss")
        drain "$count"
        batch_runs+=("$(python_peer send-batch "$count" "$SIZE")")
        R[py_send_rss]=$(rss_mb "$WORK/last-python.rss")
        drain "$count"
        single_runs+=("$(python_peer send-single "$count" "$SIZE")")
        drain "$count"
    done
    R[raw_send_$count]=$(median_of "${raw_runs[@]}")
    R[ours_send_$count]=$(median_of "${ours_runs[@]}")
    R[py_batch_$count]=$(median_of "${batch_runs[@]}")
    R[py_single_$count]=$(median_of "${single_runs[@]}")
done

# --- consumer -------------------------------------------------------------------------------
echo "raw receive ceiling..." >&2
fill "$CONSUMER_COUNT"
R[raw_receive]=$(raw_receive "$CONSUMER_COUNT" "$RAW_CREDIT")
measure_consumer() { # PREFETCH KEY: medians of ours, Python and raw at the same credit, in R[*_recv_KEY]
    local prefetch=$1 key=$2 credit raw_runs=() ours_runs=() python_runs=()
    # The ceiling at the same credit: with prefetch 0 every message is a round trip.
    credit=$((prefetch > 0 ? prefetch : 1))
    for _ in $(seq 1 "$REPEATS"); do
        fill "$CONSUMER_COUNT"
        raw_runs+=("$(raw_receive "$CONSUMER_COUNT" "$credit")")
        fill "$CONSUMER_COUNT"
        ours_runs+=("$(ours_consume "$CONSUMER_COUNT" "$prefetch")")
        R[ours_recv_rss_$key]=$(rss_mb "$WORK/last-ours.rss")
        fill "$CONSUMER_COUNT"
        python_runs+=("$(python_peer receive "$CONSUMER_COUNT" "$prefetch")")
        R[py_recv_rss_$key]=$(rss_mb "$WORK/last-python.rss")
    done
    R[raw_recv_$key]=$(median_of "${raw_runs[@]}")
    R[ours_recv_$key]=$(median_of "${ours_runs[@]}")
    R[py_recv_$key]=$(median_of "${python_runs[@]}")
}
for prefetch in $PREFETCHES; do
    echo "consumer, prefetch $prefetch (x$REPEATS)..." >&2
    measure_consumer "$prefetch" "$prefetch"
done
# At prefetch 0 every message is a round trip through two sleeping processes. On a virtual
# machine, waking a process on another vCPU goes through the hypervisor, and that cost (the
# same for every client) dominates the round trip. Rerun with the broker and each client on
# one CPU, where a wake-up is a local switch: what remains is what the clients themselves do.
one_cpu="" allowed_cpus=""
if [[ "${BENCH_ONE_CPU:-1}" == 1 && " $PREFETCHES " == *" 0 "* ]] && command -v taskset >/dev/null && (($(nproc) > 1)); then
    allowed_cpus=$(taskset -c -p $$ | sed 's/.*: *//') # e.g. "0-3" or "2,5"
    one_cpu=${allowed_cpus%%[,-]*}
    if ! taskset -a -c -p "$one_cpu" "${PIDS[0]}" >/dev/null 2>&1; then
        echo "cannot pin the broker to CPU $one_cpu: skipping the one-CPU rerun" >&2
        one_cpu=""
    fi
fi
if [[ -n "$one_cpu" ]]; then
    echo "consumer, prefetch 0, broker and clients on CPU $one_cpu (x$REPEATS)..." >&2
    PIN=(taskset -c "$one_cpu")
    measure_consumer 0 one_cpu
    PIN=()
    taskset -a -c -p "$allowed_cpus" "${PIDS[0]}" >/dev/null ||
        echo "could not give the broker its CPUs back; later figures ran on CPU $one_cpu" >&2
fi

# --- cold start (workload identity: token file -> token endpoint -> $cbs over TLS) -----------
echo "cold start..." >&2
cold_producer=()
cold_consumer=()
for _ in $(seq 1 "$COLD_RUNS"); do
    log=$(next_log cold-producer)
    started=$(date +%s%N)
    with_env "$WORKLOAD_ENV" env OPERATION_MODE=producer MESSAGE_COUNT=1 RUST_LOG=info "$OURS" >"$log.out" 2>"$log.err" ||
        die "cold producer failed: $(tail -n 5 "$log.err")"
    seconds=$("$PYTHON" "$HELPERS/logspan.py" "$log.err" --since-ns "$started" 'Sent 1 messages')
    cold_producer+=("$(awk -v s="$seconds" 'BEGIN { printf "%.1f", s * 1000 }')")
done
for _ in $(seq 1 "$COLD_RUNS"); do
    log=$(next_log cold-consumer)
    started=$(date +%s%N)
    with_env "$WORKLOAD_ENV" env OPERATION_MODE=consumer MESSAGE_COUNT=1 CONSUMER_IDLE_TIMEOUT=10s \
        RUST_LOG=info,servicebusdemo::consumer=debug "$OURS" >"$log.out" 2>"$log.err" ||
        die "cold consumer failed: $(tail -n 5 "$log.err")"
    seconds=$("$PYTHON" "$HELPERS/logspan.py" "$log.err" --since-ns "$started" 'message settled')
    cold_consumer+=("$(awk -v s="$seconds" 'BEGIN { printf "%.1f", s * 1000 }')")
done
R[cold_producer]=$(printf '%s\n' "${cold_producer[@]}" | median)
R[cold_consumer]=$(printf '%s\n' "${cold_consumer[@]}" | median)

# Peak RSS on the workload-identity path too (TLS and the token exchange add to it).
echo "peak RSS with workload identity..." >&2
count=${PRODUCER_COUNTS##* }
log=$(next_log rss-producer)
with_env "$WORKLOAD_ENV" env OPERATION_MODE=producer MESSAGE_COUNT="$count" MESSAGE_SIZE="$SIZE" RUST_LOG=info \
    /usr/bin/time -f %M -o "$log.rss" "$OURS" >"$log.out" 2>"$log.err" || die "producer failed: $(tail -n 5 "$log.err")"
R[ours_send_rss_wi]=$(rss_mb "$log.rss")
log=$(next_log rss-consumer)
prefetch=$LAST_PREFETCH
with_env "$WORKLOAD_ENV" env OPERATION_MODE=consumer MESSAGE_COUNT="$count" PREFETCH="$prefetch" CONSUMER_IDLE_TIMEOUT=10s \
    RUST_LOG=info /usr/bin/time -f %M -o "$log.rss" "$OURS" >"$log.out" 2>"$log.err" || die "consumer failed: $(tail -n 5 "$log.err")"
R[ours_recv_rss_wi]=$(rss_mb "$log.rss")

# --- scaler ---------------------------------------------------------------------------------
echo "scaler GetMetrics..." >&2
with_env "$SAS_ENV" env OPERATION_MODE=scaler SCALER_GRPC_ADDR=127.0.0.1:0 SCALER_CACHE_TTL=60s RUST_LOG=info \
    "$OURS" >"$WORK/scaler.out" 2>"$WORK/scaler.err" &
PIDS+=("$!")
grpc_addr=""
for _ in $(seq 1 300); do
    grpc_addr=$(sed -n 's/.*grpc_addr=\([0-9.:]*\).*/\1/p' "$WORK/scaler.err" | head -n 1)
    [[ -n "$grpc_addr" ]] && break
    sleep 0.1
done
[[ -n "$grpc_addr" ]] || die "the scaler did not start: $(tail -n 5 "$WORK/scaler.err")"
"$LOAD" "$grpc_addr" "$QUEUE" "$SCALER_CALLERS" "$SCALER_WAVES" >"$WORK/load.out" 2>"$WORK/load.err" ||
    die "scaler load failed: $(cat "$WORK/load.err")"
R[scaler_p50]=$(json_field "$WORK/load.out" p50_ms)
R[scaler_p99]=$(json_field "$WORK/load.out" p99_ms)

# --- binary size ----------------------------------------------------------------------------
R[size]=$(stat -c %s "$OURS")
strip -o "$WORK/stripped" "$OURS" 2>/dev/null && R[size_stripped]=$(stat -c %s "$WORK/stripped")

# --- the table ------------------------------------------------------------------------------
ratio() { # A B -> A/B as "12.3x", or "-"
    awk -v a="$1" -v b="$2" 'BEGIN { if (a != "" && b != "" && b > 0) printf "%.1fx", a / b; else print "-" }'
}
percent() { # A B -> A/B as "45%", or "-"
    awk -v a="$1" -v b="$2" 'BEGIN { if (a != "" && b != "" && b > 0) printf "%.0f%%", 100 * a / b; else print "-" }'
}
thousands() { # a number rounded, with thousands separators, or "-"
    if [[ -z "$1" ]]; then
        echo "-"
    else
        awk -v n="$1" 'BEGIN { printf "%.0f", n }' | sed -e ':a' -e 's/\B[0-9]\{3\}\>/,&/' -e 'ta'
    fi
}
mb() {
    awk -v b="$1" 'BEGIN { if (b != "") printf "%.1f MB", b / 1048576; else print "-" }'
}
row() {
    printf '| %s | %s | %s | %s | %s | %s |\n' "$@"
}

echo
echo "servicebusdemo benchmark: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), ${SIZE}-byte bodies, sblocal release build"
echo
row "Measurement" "ours" "Python azure-servicebus" "raw fe2o3 ceiling" "ours / Python" "ours / ceiling"
row "---" "---:" "---:" "---:" "---:" "---:"
for count in $PRODUCER_COUNTS; do
    ours=${R[ours_send_$count]}
    row "producer, $(thousands "$count") msgs (msg/s, median of $REPEATS; Python: ServiceBusMessageBatch)" "$(thousands "$ours")" \
        "$(thousands "${R[py_batch_$count]}")" "$(thousands "${R[raw_send_$count]}")" \
        "$(ratio "$ours" "${R[py_batch_$count]}")" "$(percent "$ours" "${R[raw_send_$count]}")"
    row "producer, $(thousands "$count") msgs (msg/s; Python: single sends)" "$(thousands "$ours")" \
        "$(thousands "${R[py_single_$count]}")" "-" "$(ratio "$ours" "${R[py_single_$count]}")" "-"
done
for prefetch in $PREFETCHES; do
    ours=${R[ours_recv_$prefetch]}
    row "consumer receive+complete, prefetch $prefetch, $(thousands "$CONSUMER_COUNT") msgs (msg/s, median of $REPEATS; ceiling at the same credit)" \
        "$(thousands "$ours")" "$(thousands "${R[py_recv_$prefetch]}")" "$(thousands "${R[raw_recv_$prefetch]}")" \
        "$(ratio "$ours" "${R[py_recv_$prefetch]}")" "$(percent "$ours" "${R[raw_recv_$prefetch]}")"
done
if [[ -n "$one_cpu" ]]; then
    ours=${R[ours_recv_one_cpu]}
    row "consumer receive+complete, prefetch 0, broker and client on one CPU (msg/s, median of $REPEATS)" \
        "$(thousands "$ours")" "$(thousands "${R[py_recv_one_cpu]}")" "$(thousands "${R[raw_recv_one_cpu]}")" \
        "$(ratio "$ours" "${R[py_recv_one_cpu]}")" "$(percent "$ours" "${R[raw_recv_one_cpu]}")"
fi
row "broker ceiling out: raw receive+complete, credit $RAW_CREDIT (msg/s)" "-" "-" "$(thousands "${R[raw_receive]}")" "-" "-"
row "cold start producer: exec -> first message accepted (ms, median of $COLD_RUNS, workload identity)" \
    "${R[cold_producer]}" "-" "-" "-" "-"
row "cold start consumer: exec -> first message completed (ms, median of $COLD_RUNS, workload identity)" \
    "${R[cold_consumer]}" "-" "-" "-" "-"
row "peak RSS producer (MB, last producer run, SAS)" "${R[ours_send_rss]}" "${R[py_send_rss]}" "-" \
    "$(ratio "${R[ours_send_rss]}" "${R[py_send_rss]}")" "-"
row "peak RSS consumer (MB, prefetch $LAST_PREFETCH, SAS)" "${R[ours_recv_rss_$LAST_PREFETCH]}" "${R[py_recv_rss_$LAST_PREFETCH]}" "-" \
    "$(ratio "${R[ours_recv_rss_$LAST_PREFETCH]}" "${R[py_recv_rss_$LAST_PREFETCH]}")" "-"
row "peak RSS producer / consumer (MB, workload identity over TLS, $(thousands "$count") msgs)" \
    "${R[ours_send_rss_wi]} / ${R[ours_recv_rss_wi]}" "-" "-" "-" "-"
row "release binary size (as built / stripped)" "$(mb "${R[size]}") / $(mb "${R[size_stripped]:-}")" "-" "-" "-" "-"
row "scaler GetMetrics from cache, $SCALER_CALLERS concurrent callers x $SCALER_WAVES (ms p50 / p99)" \
    "${R[scaler_p50]} / ${R[scaler_p99]}" "-" "-" "-" "-"
echo
echo "Raw ceiling: pre-encoded batches, 8 in flight (in); receive with automatic credit, complete each (out)."
echo "Throughput clocks start once the link is open (ours: from the log; Python and raw: in-process)."
