# shellcheck shell=bash
# What scripts/test-deps and scripts/services share: the pinned versions,
# where everything lives under target/deps, and the one line per step that
# both print. Sourced, never run.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DEPS="$ROOT/target/deps"
# Pid files, generated configs and logs of the brokers scripts/services runs.
RUN="$DEPS/run"
LOGS="$DEPS/logs"

# The newest nats-server that builds with this machine's Go without
# fetching another toolchain (GOTOOLCHAIN=local); 2.11 or newer, since
# Debian's 2.9 silently ignores the 2.10+ settings JetStream code relies on.
NATS_VERSION=v2.15.2
NATS_BIN="$DEPS/nats/$NATS_VERSION/nats-server"
NATS_PORT=4222
NATS_MONITOR_PORT=8222

KAFKA_POM="$ROOT/scripts/kafka/pom.xml"
KAFKA_LIB="$DEPS/kafka/lib"
KAFKA_PORT=9092
KAFKA_CONTROLLER_PORT=9093

AMQP_PORT=5672
RABBITMQ_MANAGEMENT_PORT=15672

mkdir -p "$RUN" "$LOGS"

now_ns() { date +%s%N; }

# Seconds since $1 (nanoseconds), one decimal.
since() {
  local ms=$((($(now_ns) - $1) / 1000000))
  printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100))
}

# Whether something accepts TCP connections on 127.0.0.1:$1.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# step LABEL FUNCTION [ARGS...]: runs one step and prints one line, its
# label, what it did and how long it took. The function runs in a subshell
# with errexit in force (a plain `if fn` would switch errexit off inside
# it); its output goes to target/deps/logs/<label>.log, and it reports what
# it did with `did WORDS` and, before failing, how to fix it with `hint
# WORDS`. A failed step prints the tail of its log and its hint, and
# returns 1.
step() {
  local label=$1 t0 log result rc=0
  shift
  t0=$(now_ns)
  log="$LOGS/${label//[^A-Za-z0-9._-]/-}.log"
  printf '%-30s ' "$label"
  (
    set -euo pipefail
    did() { printf '%s\n' "$*" >"$log.did"; }
    hint() { printf '%s\n' "$*" >"$log.hint"; }
    rm -f "$log.did" "$log.hint"
    "$@"
  ) >"$log" 2>&1 </dev/null &
  wait $! || rc=$?
  result=$(cat "$log.did" 2>/dev/null || echo done)
  if [ "$rc" = 0 ]; then
    printf '%s (%s s)\n' "$result" "$(since "$t0")"
    return 0
  fi
  printf 'FAILED (%s s)\n' "$(since "$t0")"
  if [ -s "$log" ]; then
    printf '    --- last lines of %s\n' "${log#"$ROOT"/}" >&2
    tail -n 15 "$log" | sed 's/^/    /' >&2
  fi
  printf 'error: %s\n' "$(cat "$log.hint" 2>/dev/null || echo "$label failed; see ${log#"$ROOT"/}")" >&2
  return 1
}

# wait_for SECONDS WHAT COMMAND...: polls COMMAND every 0.2 s until it
# succeeds; fails, naming WHAT, when SECONDS have passed.
wait_for() {
  local secs=$1 what=$2 deadline
  deadline=$(($(date +%s) + secs))
  shift 2
  until "$@"; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "gave up after $secs s waiting for $what" >&2
      return 1
    fi
    sleep 0.2
  done
}
