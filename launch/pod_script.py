"""The bash script every TPU worker of a launch.pod job runs, and the parsing of its output.

  bash ~/cirrus-<run id>.sh fingerprint   one `CIRRUS_FINGERPRINT {json}` line: python, jax,
                                          jaxlib, libtpu, code hash (compared across workers)
  bash ~/cirrus-<run id>.sh run           starts launch.train, or waits for the one running

The script is idempotent (a pid file per run id: a second start waits for the first and
reports its exit code), clears stale holders of /dev/accel* and /dev/vfio and the libtpu lock
file, and maps exit codes so that ssh never exits 255 (gcloud re-runs such a command): 0, 1
and 42 pass through, anything else becomes 2.
"""

import json
import shlex

from launch import distributed
from research.errors import UserError

_SCRIPT = r"""#!/bin/bash
# Cirrus per-worker script for run @RUN_ID@ (rendered by launch/pod_script.py).
#   bash @STAGE@.sh fingerprint   print this worker's environment fingerprint (one JSON line)
#   bash @STAGE@.sh run           start launch.train (or wait for the one already running)
# Exit codes: 0 done, 1 user error, 42 preempted, 2 anything else; never 255 (ssh's own).
set -u
RUN_ID=@RUN_ID_Q@
WORKDIR=@WORKDIR_Q@
PYTHON=@PYTHON_Q@
STAGE="$HOME/@STAGE@"
CODE_DIR="$STAGE/code"
STATE_DIR="/tmp/cirrus/$RUN_ID"
PID_FILE="$STATE_DIR/pid"
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

running_pid() {
  local pid
  pid=$(cat "$PID_FILE" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

unpack() {
  rm -rf "$CODE_DIR" && mkdir -p "$CODE_DIR" && tar xzf "$STAGE.tar.gz" -C "$CODE_DIR"
}

clear_stale_tpu_holders() {
  local dev pid
  for dev in /dev/accel* /dev/vfio/*; do
    [ -e "$dev" ] || continue
    for pid in $(sudo lsof -t "$dev" 2>/dev/null || sudo fuser "$dev" 2>/dev/null); do
      [ "$pid" = "$$" ] && continue
      echo "cirrus: killing stale holder $pid of $dev"
      sudo kill -9 "$pid" 2>/dev/null || true
    done
  done
  sudo rm -f /tmp/libtpu_lockfile 2>/dev/null || rm -f /tmp/libtpu_lockfile
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

run() {
  local pid code worker
  if pid=$(running_pid); then
    echo "cirrus: run $RUN_ID already running as pid $pid; waiting for it"
    while kill -0 "$pid" 2>/dev/null; do sleep 2; done
    code=$(cat "$EXIT_FILE" 2>/dev/null || echo 2)
    return "$(map_exit_code "$code")"
  fi
  echo $$ > "$PID_FILE"
  rm -f "$EXIT_FILE"
  unpack || return 2
  cd "$CODE_DIR" || return 2
  @SETUP@ || { echo "cirrus: setup failed"; return 2; }
  clear_stale_tpu_holders
  worker=$(worker_id)
  fingerprint | sed 's/^CIRRUS_FINGERPRINT //' \
    | gcloud storage cp - "$WORKDIR/fingerprints/worker_$worker.json" >/dev/null 2>&1 || true
  export @DISTRIBUTED@=auto @RUN_ID_VAR@="$RUN_ID" PYTHONUNBUFFERED=1
  @TRAIN@ 2>&1 | tee -a "$LOG_FILE"
  code=${PIPESTATUS[0]}
  echo "$code" > "$EXIT_FILE"
  gcloud storage cp "$LOG_FILE" "$WORKDIR/logs/worker_$worker.log" >/dev/null 2>&1 || true
  rm -f "$PID_FILE"
  return "$(map_exit_code "$code")"
}

case "${1:-run}" in
  fingerprint)
    if ! running_pid >/dev/null; then unpack || exit 2; fi
    fingerprint || exit 2 ;;
  run) run; exit $? ;;
  *) echo "usage: $0 fingerprint|run"; exit 2 ;;
esac
"""


def render_script(job, train_command: list[str]) -> str:
    """The script for `job` (a launch.pod.PodJob) that runs `train_command` (an argv whose
    first element is job.python) on every worker."""
    train = shlex.join(train_command).replace(shlex.quote(job.python), '"$PYTHON"', 1)
    replacements = {
        "@RUN_ID_Q@": shlex.quote(job.run_id),
        "@WORKDIR_Q@": shlex.quote(job.workdir),
        "@PYTHON_Q@": shlex.quote(job.python),
        "@RUN_ID@": job.run_id,
        "@STAGE@": job.stage,
        "@SETUP@": job.setup_command or "true",
        "@DISTRIBUTED@": distributed.DISTRIBUTED,
        "@RUN_ID_VAR@": distributed.RUN_ID,
        "@TRAIN@": train,
    }
    script = _SCRIPT
    for key, value in replacements.items():
        script = script.replace(key, value)
    return script


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
