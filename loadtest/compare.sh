#!/usr/bin/env bash
# Runs the same load cases against nexus-node and its peers, in turns
# (round 1: nexus, node, yardstick, sockudo; round 2: the same again; ...),
# starting every broker fresh for every run, and writes the raw result lines
# and one Markdown table to loadtest/results/<date>/.
#
# Peers: the Node.js reference (loadtest/node-reference), the epoll
# yardstick (loadtest/yardstick) and Sockudo when `sockudo` is on PATH
# (see loadtest/peers.md). Every run is bounded by --duration and by
# `timeout`; the script kills only the processes it started.
#
# Before every run it waits until the machine is quiet (1-minute load below
# QUIET_LOAD, for at most QUIET_WAIT seconds) and records in each result line
# the load it started at (`load_before`) and the CPU that other processes used
# during the run (`other_cores`), so that figures taken on a busy machine
# stand out.
#
# Usage: loadtest/compare.sh            (all cases, 2 rounds)
#        CASES="fanout topics" ROUNDS=3 BROKERS="nexus yardstick" loadtest/compare.sh
# Broker `nexus-cN` is nexus-node with `--cores N`, labelled as such.
# Every setting below can be overridden from the environment.

set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")

ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-15}
CASES=${CASES:-"fanout fanout_rate topics connections storm cluster"}
BROKERS=${BROKERS:-"nexus node yardstick sockudo"}
OUT=${OUT:-$here/results/$(date +%Y-%m-%d_%H%M%S)}
SKIP_BUILD=${SKIP_BUILD:-0}
# Client threads of the load generator; the brokers get the rest of the machine.
THREADS=${THREADS:-1}
# Generator processes; each may hold at most `ulimit -n` sockets.
PROCESSES=${PROCESSES:-1}
# Source addresses of the generator's connections (space-separated, e.g.
# "127.0.0.2 127.0.0.3"); empty: the kernel picks. One address has about
# 28,000 ephemeral ports per broker port, and connections closed by the
# previous run hold theirs in TIME_WAIT for 60 s.
BIND_IPS=${BIND_IPS:-}
# A run starts when the 1-minute load average is below QUIET_LOAD, or after
# QUIET_WAIT seconds of waiting (polled every 20 s), whichever comes first.
# CPU lists (in `taskset -c` form) for the brokers and for the generator, for
# example BROKER_CPUS=0 GENERATOR_CPUS=1 to keep them off each other's core.
# Empty lets the kernel place them. nexus-node runs its cores on BROKER_CPUS only.
BROKER_CPUS=${BROKER_CPUS:-}
GENERATOR_CPUS=${GENERATOR_CPUS:-}
QUIET_LOAD=${QUIET_LOAD:-1.0}
QUIET_WAIT=${QUIET_WAIT:-600}

FANOUT_SUBSCRIBERS=${FANOUT_SUBSCRIBERS:-500}
# Messages in flight (published, not yet at every subscriber) in the throughput case.
FANOUT_IN_FLIGHT=${FANOUT_IN_FLIGHT:-100}
# Messages per second in the fixed-load case (times FANOUT_SUBSCRIBERS deliveries).
FANOUT_RATE=${FANOUT_RATE:-100}
TOPICS_SUBSCRIBERS=${TOPICS_SUBSCRIBERS:-1000}
TOPICS_PUBLISHERS=${TOPICS_PUBLISHERS:-4}
CONNECTIONS=${CONNECTIONS:-10000}
STORM_CONNECTIONS=${STORM_CONNECTIONS:-2000}
# Seconds after setup at which every storm client drops and reconnects, and
# the maximum seconds the storm case runs.
STORM_AFTER=${STORM_AFTER:-5}
STORM_DURATION=${STORM_DURATION:-30}
CLUSTER_SUBSCRIBERS=${CLUSTER_SUBSCRIBERS:-500}
# Messages per second in the cluster case; empty: as fast as 1,000 messages
# in flight allow.
CLUSTER_RATE=${CLUSTER_RATE:-}

NEXUS_PORT=3001
NODE_PORT=3201
YARDSTICK_PORT=3101
SOCKUDO_PORT=3301
REDIS_PORT=${REDIS_PORT:-6390}
SOCKUDO_CONFIG=$here/sockudo.toml
SOCKUDO_APP=(--app-id nexus-bench --app-key nexus-bench-key --app-secret nexus-bench-secret)

# Binaries; point these at copies to keep a build in another tree from
# replacing them during a long comparison.
loadtest=${LOADTEST_BIN:-$root/target/release/nexus-loadtest}
nexus=${NEXUS_BIN:-$root/target/release/nexus-node}
yardstick=${YARDSTICK_BIN:-$root/target/release/nexus-yardstick}

# Pids of the processes this script started and has not stopped yet.
started=()
# Pids of the broker processes of the current run.
broker_pids=()
# WebSocket URLs of the current run, one per node.
broker_urls=()

log() { printf '%s compare: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

cleanup() {
    local pid
    for pid in ${started[@]+"${started[@]}"}; do
        kill "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Starts a command in the background with its output in $2 and records its pid in $spawned.
spawn() {
    local name=$1 logfile=$2
    shift 2
    "$@" >"$logfile" 2>&1 &
    spawned=$!
    started+=("$spawned")
    log "started $name (pid $spawned)"
}

# Stops one process this script started: SIGTERM, then SIGKILL after 10 s.
stop() {
    local pid=$1 waited=0
    kill "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null && ((waited < 100)); do
        sleep 0.1
        waited=$((waited + 1))
    done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    local kept=()
    for other in ${started[@]+"${started[@]}"}; do
        [[ $other == "$pid" ]] || kept+=("$other")
    done
    started=(${kept[@]+"${kept[@]}"})
}

# Waits up to 15 s until something accepts TCP connections on 127.0.0.1:$1.
wait_for_port() {
    local port=$1 tries=0
    until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
        tries=$((tries + 1))
        if ((tries > 150)); then
            log "nothing listens on port $port after 15 s"
            return 1
        fi
        sleep 0.1
    done
}

# Waits up to 15 s until GET /health on port $1 reports "status":"ok", which
# for a cluster member means its Redis link is up (nexus-node and the Node
# reference serve the same report).
wait_for_health() {
    local port=$1 tries=0
    until curl -fsS --max-time 1 "http://127.0.0.1:$port/health" 2>/dev/null | grep -q '"status":"ok"'; do
        tries=$((tries + 1))
        if ((tries > 150)); then
            log "node on port $port is not healthy after 15 s"
            return 1
        fi
        sleep 0.1
    done
}

sockudo_bin() {
    command -v sockudo 2>/dev/null || true
}

# Starts the broker(s) for one run, filling broker_pids and broker_urls.
# $1 broker, $2 number of nodes (2 for the cluster case), $3 log prefix.
start_broker() {
    local broker=$1 nodes=$2 prefix=$3 i port
    # Started under taskset, so that a broker that sizes itself by its CPUs counts only these.
    local pin=()
    [[ -z $BROKER_CPUS ]] || pin=(taskset -c "$BROKER_CPUS")
    broker_pids=()
    broker_urls=()
    for ((i = 0; i < nodes; i++)); do
        case $broker in
        nexus | nexus-c*)
            port=$((NEXUS_PORT + i))
            local extra=()
            ((nodes > 1)) && extra+=(--redis "redis://127.0.0.1:$REDIS_PORT")
            [[ $broker == nexus-c* ]] && extra+=(--cores "${broker#nexus-c}")
            spawn "nexus-node :$port" "$prefix.nexus$i.log" \
                ${pin[@]+"${pin[@]}"} "$nexus" --listen "127.0.0.1:$port" --log-level warn ${extra[@]+"${extra[@]}"}
            ;;
        node)
            port=$((NODE_PORT + i))
            local redis_url=""
            ((nodes > 1)) && redis_url="redis://127.0.0.1:$REDIS_PORT"
            spawn "node reference :$port" "$prefix.node$i.log" \
                ${pin[@]+"${pin[@]}"} env PORT="$port" REDIS_URL="$redis_url" LOG_LEVEL=warn \
                node "$here/node-reference/server.js"
            ;;
        yardstick)
            port=$YARDSTICK_PORT
            spawn "yardstick :$port" "$prefix.yardstick.log" \
                ${pin[@]+"${pin[@]}"} "$yardstick" --listen "127.0.0.1:$port"
            ;;
        sockudo)
            port=$SOCKUDO_PORT
            spawn "sockudo :$port" "$prefix.sockudo.log" \
                ${pin[@]+"${pin[@]}"} "$(sockudo_bin)" --config "$SOCKUDO_CONFIG"
            ;;
        esac
        broker_pids+=("$spawned")
        broker_urls+=("ws://127.0.0.1:$port/")
        wait_for_port "$port" || return 1
        if [[ $broker == nexus* || $broker == node ]]; then
            wait_for_health "$port" || return 1
        fi
    done
}

stop_broker() {
    local pid
    for pid in ${broker_pids[@]+"${broker_pids[@]}"}; do
        stop "$pid"
    done
    broker_pids=()
}

# Prints the generator arguments of one case, one per line.
case_args() {
    case $1 in
    fanout)
        # As fast as the in-flight window allows: the throughput ceiling.
        printf '%s\n' fanout --subscribers "$FANOUT_SUBSCRIBERS" --publishers 1 \
            --in-flight "$FANOUT_IN_FLIGHT"
        ;;
    fanout_rate)
        # A fixed load every broker should carry: latency at equal work.
        printf '%s\n' fanout --subscribers "$FANOUT_SUBSCRIBERS" --publishers 1 --rate "$FANOUT_RATE"
        ;;
    topics)
        printf '%s\n' topics --subscribers "$TOPICS_SUBSCRIBERS" --publishers "$TOPICS_PUBLISHERS"
        ;;
    connections)
        printf '%s\n' connections --connections "$CONNECTIONS"
        ;;
    storm)
        # --duration bounds the wait for the storm and the reconnects.
        printf '%s\n' storm --connections "$STORM_CONNECTIONS" --storm-after "$STORM_AFTER" \
            --duration "$STORM_DURATION"
        ;;
    cluster)
        printf '%s\n' cluster --subscribers "$CLUSTER_SUBSCRIBERS" --publishers 1
        [[ -z $CLUSTER_RATE ]] || printf '%s\n' --rate "$CLUSTER_RATE"
        ;;
    *)
        log "unknown case $1"
        return 1
        ;;
    esac
}

# Whether broker $1 takes part in case $2, and is installed.
applies() {
    local broker=$1 name=$2
    if [[ $broker == sockudo && -z $(sockudo_bin) ]]; then
        return 1
    fi
    if [[ $name == cluster ]]; then
        # Only nexus-node and the Node reference have a Redis cluster mode here.
        [[ $broker == nexus* || $broker == node ]] && command -v redis-server >/dev/null
        return
    fi
    return 0
}

# Runs one case against one broker and appends its result line.
run_one() {
    local round=$1 name=$2 broker=$3
    local prefix="$OUT/logs/r${round}-${name}-${broker}"
    local nodes=1
    [[ $name == cluster ]] && nodes=2

    local line status=0
    wait_for_quiet
    take_cpu_snapshot
    local cpu_before=$snapshot
    if ! start_broker "$broker" "$nodes" "$prefix"; then
        log "round $round: $broker did not start for $name, see $prefix.*.log"
        stop_broker
        record_result '{}' 1 "$broker" "$name" "$round" "$cpu_before"
        return
    fi

    local args=()
    mapfile -t args < <(case_args "$name")
    local url pid
    for url in "${broker_urls[@]}"; do args+=(--url "$url"); done
    for pid in "${broker_pids[@]}"; do args+=(--pid "$pid"); done
    if [[ $broker == sockudo ]]; then
        args+=(--protocol pusher "${SOCKUDO_APP[@]}")
    fi
    [[ $name == storm ]] || args+=(--duration "$DURATION")
    local ip
    for ip in $BIND_IPS; do args+=(--bind-ip "$ip"); done
    args+=(--processes "$PROCESSES" --threads "$THREADS" --label "$broker" --json)

    log "round $round: $name on $broker"
    # The generator stops by itself; timeout only guards against a hang.
    local pin=()
    [[ -z $GENERATOR_CPUS ]] || pin=(taskset -c "$GENERATOR_CPUS")
    line=$(timeout --kill-after=10 $((DURATION * 4 + STORM_DURATION + 120)) \
        ${pin[@]+"${pin[@]}"} "$loadtest" "${args[@]}" 2>"$prefix.loadtest.log") || status=$?
    stop_broker

    if [[ $status -ne 0 || -z $line ]]; then
        log "round $round: $name on $broker failed (exit $status), see $prefix.loadtest.log"
        line='{}'
    fi
    record_result "$line" "$status" "$broker" "$name" "$round" "$cpu_before"
}

# Waits until the 1-minute load average is below QUIET_LOAD, polling every
# 20 s for at most QUIET_WAIT seconds, and sets load_before to the load the
# run starts at. A run still starts after the wait; its line records the load.
wait_for_quiet() {
    local waited=0
    load_before=$(cut -d' ' -f1 /proc/loadavg)
    while awk -v load="$load_before" -v limit="$QUIET_LOAD" 'BEGIN { exit !(load >= limit) }' &&
        ((waited < QUIET_WAIT)); do
        log "1-minute load $load_before is not below $QUIET_LOAD; waiting ($waited s so far)"
        sleep 20
        waited=$((waited + 20))
        load_before=$(cut -d' ' -f1 /proc/loadavg)
    done
}

# Sets snapshot to "OWN MACHINE NOW": CPU seconds of this script's reaped children (brokers
# and generators) and of redis-server, and the machine's busy CPU seconds
# (user, nice and system in /proc/stat), and the wall time. Runs `times` in this shell, not in a
# subshell, because a subshell has children of its own.
take_cpu_snapshot() {
    times >"$OUT/logs/times"
    local redis_ticks=0 tick
    tick=$(getconf CLK_TCK)
    if [[ -n $redis_pid && -r /proc/$redis_pid/stat ]]; then
        # utime and stime are fields 14 and 15; the command name before them has no spaces.
        redis_ticks=$(awk '{ print $14 + $15 }' "/proc/$redis_pid/stat")
    fi
    snapshot=$(
        awk -v redis="$redis_ticks" -v tick="$tick" '
        NR == 2 {
            for (i = 1; i <= 2; i++) {
                split($i, part, "m")
                sub(/s$/, "", part[2])
                own += part[1] * 60 + part[2]
            }
        }
        END { printf "%.2f ", own + redis / tick }' "$OUT/logs/times"
        awk -v tick="$tick" '$1 == "cpu" { printf "%.2f ", ($2 + $3 + $4) / tick }' /proc/stat
        date +%s.%N
    )
}

# Appends result line $1 to results.jsonl with the exit status, broker, case
# and round, the load the run started at, and the cores that other processes
# used during it: the machine's busy time since snapshot $6 (take_cpu_snapshot)
# less that of this script's processes, over the run's wall time. Kernel
# threads, such as ksoftirqd doing loopback work, count as other processes.
record_result() {
    local other
    take_cpu_snapshot
    other=$(awk -v before="$6" -v after="$snapshot" 'BEGIN {
        split(before, b, " ")
        split(after, a, " ")
        spent = (a[2] - b[2]) - (a[1] - b[1])
        wall = a[3] - b[3]
        printf "%.2f", (spent > 0 && wall > 0) ? spent / wall : 0
    }')
    jq -c --argjson exit "$2" --arg broker "$3" --arg case "$4" --argjson round "$5" \
        --argjson load "$load_before" --argjson other "$other" \
        '. + {broker: $broker, case: $case, round: $round, exit: $exit,
              load_before: $load, other_cores: $other}' \
        <<<"$1" >>"$OUT/results.jsonl"
}

start_redis() {
    if (exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT") 2>/dev/null; then
        log "port $REDIS_PORT is in use; set REDIS_PORT to a free port"
        exit 1
    fi
    spawn "redis-server :$REDIS_PORT" "$OUT/logs/redis.log" \
        redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no
    redis_pid=$spawned
    wait_for_port "$REDIS_PORT"
}

# Prints one Markdown table from the result lines: per case and broker, the
# median over the rounds of each measure.
write_table() {
    python3 - "$1" <<'PYTHON'
import json, statistics, sys
from collections import OrderedDict

runs = OrderedDict()
with open(sys.argv[1]) as lines:
    for line in lines:
        run = json.loads(line)
        runs.setdefault((run["case"], run["broker"]), []).append(run)

def get(run, *path):
    for key in path:
        if not isinstance(run, dict) or run.get(key) is None:
            return None
        run = run[key]
    return run

def median(group, *path):
    values = [get(run, *path) for run in group if run.get("exit") == 0]
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else None

def fmt(value, scale=1.0, digits=0):
    return "–" if value is None else f"{value * scale:,.{digits}f}"

def highest(group, key):
    values = [run[key] for run in group if run.get(key) is not None]
    return max(values) if values else None

columns = ["case", "broker", "ok runs", "publishes/s", "deliveries/s (min–max)", "p50 ms",
           "p99 ms", "p99.9 ms", "lost", "broker CPU cores", "deliveries per CPU-s",
           "% of yardstick per CPU-s", "connects/s", "RSS B/conn", "storm all back s",
           "load before (max)", "other cores (max)", "notes"]
print("| " + " | ".join(columns) + " |")
print("|" + "---|" * len(columns))
for (case, broker), group in runs.items():
    good = [run for run in group if run.get("exit") == 0]
    rates = [run["deliveries_per_s"] for run in good if run.get("deliveries_per_s")]
    rate = statistics.median(rates) if rates else None
    spread = f" ({min(rates):,.0f}–{max(rates):,.0f})" if len(rates) > 1 else ""
    yardstick = runs.get((case, "yardstick"), [])
    # Share of the yardstick's deliveries per node CPU-second: the work per
    # CPU, which does not depend on how many cores a broker may use.
    yard_efficiency = [get(run, "node", "deliveries_per_cpu_s") for run in yardstick
                       if run.get("exit") == 0]
    yard_efficiency = [value for value in yard_efficiency if value]
    efficiency = median(good, "node", "deliveries_per_cpu_s")
    share = None
    if rate and efficiency and yard_efficiency:
        share = 100 * efficiency / statistics.median(yard_efficiency)
    notes = []
    if len(good) < len(group):
        notes.append(f"{len(group) - len(good)} failed")
    if any(run.get("generator_saturated") for run in good):
        notes.append("generator saturated")
    if any(run.get("config", {}).get("publishers") and not run.get("published") for run in good):
        notes.append("nothing published")
    errors = {}
    for run in good:
        for kind, count in (run.get("errors") or {}).items():
            errors[kind] = errors.get(kind, 0) + count
    notes.extend(f"{kind} ×{count}" for kind, count in sorted(errors.items()))
    cells = [case, broker, f"{len(good)}/{len(group)}",
             fmt(median(good, "publishes_per_s")) if rate else "–",
             fmt(rate) + spread if rate else "–",
             fmt(median(good, "latency_us", "p50"), 1e-3, 2),
             fmt(median(good, "latency_us", "p99"), 1e-3, 2),
             fmt(median(good, "latency_us", "p99_9"), 1e-3, 2),
             fmt(median(good, "lost")),
             fmt(median(good, "node", "cores"), 1, 2),
             fmt(median(good, "node", "deliveries_per_cpu_s")) if rate else "–",
             fmt(share, 1, 1),
             fmt(median(good, "connections", "connect_rate_per_s")),
             fmt(median(good, "connections", "rss_bytes_per_connection")),
             fmt(median(good, "storm", "all_back_s"), 1, 2),
             fmt(highest(group, "load_before"), 1, 2),
             fmt(highest(group, "other_cores"), 1, 2),
             ", ".join(notes)]
    print("| " + " | ".join(cells) + " |")
PYTHON
}

prepare() {
    for tool in jq python3 node curl timeout; do
        command -v "$tool" >/dev/null || { log "$tool is required"; exit 1; }
    done
    if [[ $SKIP_BUILD != 1 ]]; then
        log "building release binaries"
        (cd "$root" && cargo build --release -p nexus-node -p nexus-loadtest -p nexus-yardstick)
    fi
    if [[ ! -d $here/node-reference/node_modules ]]; then
        (cd "$here/node-reference" && npm ci --no-audit --no-fund)
    fi
    # Many client and server sockets: raise the open-file limit as far as allowed.
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    mkdir -p "$OUT/logs"
    log "writing to $OUT"
}

main() {
    prepare
    local round name broker redis_pid=""
    if [[ " $CASES " == *" cluster "* ]] && command -v redis-server >/dev/null; then
        start_redis
    fi
    for ((round = 1; round <= ROUNDS; round++)); do
        for name in $CASES; do
            for broker in $BROKERS; do
                applies "$broker" "$name" || continue
                run_one "$round" "$name" "$broker"
            done
        done
    done
    [[ -n $redis_pid ]] && stop "$redis_pid"

    {
        printf '# Broker comparison, %s\n\n' "$(date -u '+%Y-%m-%d %H:%M UTC')"
        printf 'Commit %s on %s cores (%s). %s rounds; %s s per publishing run; ' \
            "$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)" "$(nproc)" \
            "$(uname -r)" "$ROUNDS" "$DURATION"
        printf 'generator threads %s, processes %s; ' "$THREADS" "$PROCESSES"
        printf 'brokers on CPUs %s, generator on CPUs %s. ' "${BROKER_CPUS:-any}" "${GENERATOR_CPUS:-any}"
        printf 'Each cell is the median over the rounds that succeeded.\n\n'
        printf 'Binaries: `%s`, `%s`, `%s`.\n\n' "$nexus" "$yardstick" "$loadtest"
        write_table "$OUT/results.jsonl"
    } >"$OUT/results.md"
    for name in $CASES; do
        jq -c --arg case "$name" 'select(.case == $case and .latency_us != null)' \
            "$OUT/results.jsonl" >"$OUT/$name.jsonl"
        if [[ -s $OUT/$name.jsonl ]]; then
            "$loadtest" plot --input "$OUT/$name.jsonl" --output "$OUT/latency-$name.svg" \
                --title "End-to-end latency, $name" || log "plot of $name failed"
        fi
    done
    cat "$OUT/results.md"
    log "results in $OUT"
}

main "$@"
