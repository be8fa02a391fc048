"""The bash script every TPU worker of a launch.pod job runs, and the parsing of its output.

  bash ~/cirrus-<run id>.sh fingerprint   one `CIRRUS_FINGERPRINT {json}` line: python, jax,
                                          jaxlib, libtpu, code hash (compared across workers)
  bash ~/cirrus-<run id>.sh run           starts launch.train, or waits for the one running

The script is idempotent (an flock per run id: a second start waits for the first and
reports its exit code), stops launch.train processes that an earlier Cirrus job left behind
(pid file + command line; other holders of /dev/accel* are named, never killed), clears the
libtpu lock file when nothing holds the TPU, and maps exit codes so that ssh never exits 255
(gcloud re-runs such a command): 0, 1 and 42 pass through, anything else becomes 2.
"""

import json
import re
import shlex

from launch import distributed
from research.errors import UserError

_SCRIPT = r"""#!/bin/bash
# Cirrus per-worker script for run @RUN_ID_Q@ (rendered by launch/pod_script.py).
#   bash <this script> fingerprint   print this worker's environment fingerprint (one JSON line)
#   bash <this script> run           start launch.train (or wait for the one already running)
# Exit codes: 0 done, 1 user error, 42 preempted, 2 anything else; never 255 (ssh's own).
set -u
RUN_ID=@RUN_ID_Q@
WORKDIR=@WORKDIR_Q@
PYTHON=@PYTHON_Q@
SETUP=@SETUP_Q@
STAGE="$HOME"/@STAGE_Q@
CODE_DIR="$STAGE/code"
STATE_DIR="/tmp/cirrus/$RUN_ID"
LOCK_FILE="$STATE_DIR/lock"
TRAIN_PID_FILE="$STATE_DIR/train_pid"
EXIT_FILE="$STATE_DIR/exit_code"
LOG_FILE="$STATE_DIR/train.log"
mkdir -p "$STATE_DIR"

map_exit_code() {
  case "$1" in
    0|1|42) echo "$1" ;;
    *) echo 2 ;;
  esac
}

worker_id() {
  curl -sf -H Metadata-Flavor:Google \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number \
    2>/dev/null || hostname
}

unpack() {
  rm -rf "$CODE_DIR" && mkdir -p "$CODE_DIR" && tar xzf "$STAGE.tar.gz" -C "$CODE_DIR"
}

# A launch.train that an earlier Cirrus job on this worker started (its pid in
# /tmp/cirrus/<run>/train_pid, its command line still launch.train, its run's lock free: the
# script that started it is gone) is stopped: SIGTERM (it saves), SIGKILL 30 s later. Any
# other holder of the TPU is named and left alone.
clear_stale_tpu_holders() {
  local file pid cmd dev holder busy=0 lock
  for file in /tmp/cirrus/*/train_pid; do
    [ -f "$file" ] || continue
    pid=$(cat "$file" 2>/dev/null)
    case "$pid" in ''|*[!0-9]*) rm -f "$file"; continue ;; esac
    cmd=$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null) || { rm -f "$file"; continue; }
    case "$cmd" in *" -m launch.train "*) ;; *) rm -f "$file"; continue ;; esac
    lock="$(dirname "$file")/lock"
    if [ "$lock" != "$LOCK_FILE" ] && [ -e "$lock" ] && ! flock -n "$lock" true; then
      echo "cirrus: pid $pid ($file) belongs to a Cirrus job still running; not stopping it"
      continue
    fi
    echo "cirrus: stopping pid $pid, left by an earlier Cirrus job ($file): $cmd"
    kill -TERM "$pid" 2>/dev/null || sudo kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "cirrus: pid $pid still running 30 s after SIGTERM; SIGKILL"
      kill -KILL "$pid" 2>/dev/null || sudo kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$file"
  done
  for dev in /dev/accel* /dev/vfio/*; do
    [ -e "$dev" ] || continue
    for holder in $(sudo lsof -t "$dev" 2>/dev/null || sudo fuser "$dev" 2>/dev/null); do
      [ "$holder" = "$$" ] && continue
      echo "cirrus: pid $holder ($(ps -o args= -p "$holder" 2>/dev/null)) holds $dev and was" \
        "not started by Cirrus; not killing it (stop it, or training cannot open the TPU)"
      busy=1
    done
  done
  if [ "$busy" = 0 ]; then
    sudo rm -f /tmp/libtpu_lockfile 2>/dev/null || rm -f /tmp/libtpu_lockfile
  fi
}

fingerprint() {
  local code_hash
  code_hash=$(cd "$CODE_DIR" && find . -type f -print0 | LC_ALL=C sort -z \
    | xargs -0 sha256sum | sha256sum | cut -c1-16)
  CIRRUS_WORKER="$(worker_id)" CIRRUS_CODE_HASH="$code_hash" "$PYTHON" - <<'EOF'
import importlib.metadata as metadata, json, os, platform

def version(*names):
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return None

print("CIRRUS_FINGERPRINT " + json.dumps({
    "worker": os.environ["CIRRUS_WORKER"],
    "python": platform.python_version(),
    "jax": version("jax"),
    "jaxlib": version("jaxlib"),
    "libtpu": version("libtpu", "libtpu-nightly"),
    "code_hash": os.environ["CIRRUS_CODE_HASH"],
}, sort_keys=True))
EOF
}

# One instance per run id on a worker: the first holds an flock on $LOCK_FILE (fd 9) while it
# runs; a second start (gcloud re-running the ssh command) waits for it and reports its code.
run() {
  local code worker train_pid
  exec 9>>"$LOCK_FILE"
  if ! flock -n 9; then
    echo "cirrus: run $RUN_ID already running on this worker; waiting for it"
    flock 9
    code=$(cat "$EXIT_FILE" 2>/dev/null || echo 2)
    return "$(map_exit_code "$code")"
  fi
  rm -f "$EXIT_FILE"
  unpack || return 2
  cd "$CODE_DIR" || return 2
  bash -c "$SETUP" 9>&- || { echo "cirrus: setup failed"; return 2; }
  clear_stale_tpu_holders
  worker=$(worker_id)
  fingerprint | sed 's/^CIRRUS_FINGERPRINT //' \
    | gcloud storage cp - "$WORKDIR/fingerprints/worker_$worker.json" >/dev/null 2>&1 || true
  export @DISTRIBUTED@=auto @RUN_ID_VAR@="$RUN_ID" PYTHONUNBUFFERED=1
  @TRAIN@ > >(tee -a "$LOG_FILE") 2>&1 9>&- &
  train_pid=$!
  echo "$train_pid" > "$TRAIN_PID_FILE"
  wait "$train_pid"
  code=$?
  rm -f "$TRAIN_PID_FILE"
  echo "$code" > "$EXIT_FILE"
  gcloud storage cp "$LOG_FILE" "$WORKDIR/logs/worker_$worker.log" >/dev/null 2>&1 || true
  return "$(map_exit_code "$code")"
}

case "${1:-run}" in
  fingerprint)
    exec 9>>"$LOCK_FILE"
    if flock -n 9; then unpack || exit 2; fi  # Never under a running job's feet.
    exec 9>&-
    fingerprint || exit 2 ;;
  run) run; exit $? ;;
  *) echo "usage: $0 fingerprint|run"; exit 2 ;;
esac
"""


def render_script(job, train_command: list[str]) -> str:
    """The script for `job` (a launch.pod.PodJob) that runs `train_command` (an argv whose
    first element is job.python) on every worker. Every value is shell-quoted (launch.pod
    also validates run ids, names and paths first); --setup_command is run by `bash -c`."""
    train = shlex.join(train_command).replace(shlex.quote(job.python), '"$PYTHON"', 1)
    replacements = {
        "@RUN_ID_Q@": shlex.quote(job.run_id),
        "@WORKDIR_Q@": shlex.quote(job.workdir),
        "@PYTHON_Q@": shlex.quote(job.python),
        "@SETUP_Q@": shlex.quote(job.setup_command or "true"),
        "@STAGE_Q@": shlex.quote(job.stage),
        "@DISTRIBUTED@": distributed.DISTRIBUTED,
        "@RUN_ID_VAR@": distributed.RUN_ID,
        "@TRAIN@": train,
    }
    # One pass: a value that happens to contain a placeholder is never substituted again.
    return re.sub(r"@[A-Z_]+@", lambda match: replacements[match.group()], _SCRIPT)


def compare_fingerprints(output: str) -> list[dict]:
    """Parses `CIRRUS_FINGERPRINT {...}` lines; workers that differ are a UserError."""
    prints = [
        json.loads(line.split(" ", 1)[1])
        for line in output.splitlines()
        if line.startswith("CIRRUS_FINGERPRINT ")
    ]
    if not prints:
        raise UserError("no worker reported an environment fingerprint; see the output above.")
    keys = ("python", "jax", "jaxlib", "libtpu", "code_hash")
    first = {k: prints[0].get(k) for k in keys}
    for other in prints[1:]:
        differing = {k: (first[k], other.get(k)) for k in keys if other.get(k) != first[k]}
        if differing:
            raise UserError(
                f"workers {prints[0].get('worker')} and {other.get('worker')} differ: "
                + ", ".join(f"{k} {a} != {b}" for k, (a, b) in differing.items())
                + "; fix the runtime image or --setup_command so every worker matches."
            )
    return prints
