"""A local "pod": N launch.train processes on this machine, through the same contract as a pod.

  python -m launch.local --num_hosts=4 --devices_per_host=2 \
      --gin_file=configs/experiment/demo.gin --workdir=/tmp/pod -- --sample_prompt=

Each host is one `launch.train` process in its own process group with the
launch/distributed.py environment (coordinator on 127.0.0.1, `--devices_per_host` CPU devices
each). Its output is printed with a `[host i]` prefix and appended to
`<workdir>/logs/host_<i>.log`; `<workdir>/logs/pids.json` lists the current attempt's PIDs.

The first host to fail (an exit code other than 0 and 42) stops every host: SIGTERM, then
after `--grace_s` SIGKILL of each host's process group. A supervisor restarts the whole job
(same workdir and run id, so it resumes from the last checkpoint) when it ends preempted
(42) or killed (137 / 143), up to `--preemption_budget` times, and after other failures up
to `--failure_budget` times; a user error (1) is never retried. SIGTERM or Ctrl-C to the
launcher forwards SIGTERM to every host (they save and exit 42) and does not restart.

Hosts never outlive the launcher: each is started with the kernel's parent-death signal
(SIGTERM when the launcher dies, even by SIGKILL: the host saves and exits), a second SIGTERM
or Ctrl-C to the launcher SIGKILLs every host's process group at once, and a new launch.local
on the same workdir reads `pids.json` and stops any host an earlier launcher left behind (pid
+ command line match), or refuses, naming it, while that launcher still runs.

Exit code: the job's (0 done, 42 preempted, 1 user error, 128+N killed by signal N), never 255.
Everything after `--` goes to every launch.train process unchanged.
"""

import contextlib
import ctypes
import dataclasses
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from absl import app, flags

from launch import cli, distributed
from launch import config as gin_config
from research import sharding
from research.checkpoint import CheckpointConfig
from research.data import DataConfig, ensure_prepared
from research.errors import UserError
from research.model import ModelConfig
from research.train import TrainConfig

NUM_HOSTS = flags.DEFINE_integer("num_hosts", 2, "Processes (simulated hosts) to run.")
DEVICES_PER_HOST = flags.DEFINE_integer("devices_per_host", 1, "CPU devices per process.")
PREEMPTION_BUDGET = flags.DEFINE_integer(
    "preemption_budget", 3, "Restarts after a preemption (exit 42, 137 or 143) of the job."
)
FAILURE_BUDGET = flags.DEFINE_integer("failure_budget", 0, "Restarts after other failures.")
GRACE_S = flags.DEFINE_float(
    "grace_s", 30.0, "Seconds between SIGTERM and SIGKILL when stopping the hosts."
)
RUN_ID = flags.DEFINE_string(
    "run_id", None, "The run's id (the same across restarts); default: derived from --workdir."
)

RESTART_CODES = (cli.EXIT_PREEMPTED, 128 + signal.SIGKILL, 128 + signal.SIGTERM)


@dataclasses.dataclass
class Job:
    """One attempt: the host processes and what became of them."""

    processes: list
    readers: list
    codes: list  # Exit code per host once known (signals as 128 + N).
    order: list  # Host indices in the order they exited.


def exit_code(returncode: int) -> int:
    """Popen's returncode as a shell would report it (-N -> 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def job_code(codes: list, order: list) -> int:
    """The first failure's code; else 42 if any host was preempted; else 0."""
    for index in order:
        if codes[index] not in (0, cli.EXIT_PREEMPTED):
            return codes[index]
    return cli.EXIT_PREEMPTED if cli.EXIT_PREEMPTED in codes else 0


def default_run_id(workdir: str) -> str:
    return "local-" + hashlib.sha1(os.path.abspath(workdir).encode()).hexdigest()[:10]


def log_dir(workdir: str, run_id: str) -> str:
    """<workdir>/logs, or a local directory for a remote (gs://, s3://) workdir."""
    if "://" in workdir:
        return os.path.join(tempfile.gettempdir(), "cirrus-logs", run_id)
    return os.path.join(workdir, "logs")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def validate(num_hosts: int, devices_per_host: int, gin_files, gin_bindings, log=print):
    """Every check that can fail before a process starts; prepares the data once."""
    if num_hosts < 1 or devices_per_host < 1:
        raise UserError(
            f"--num_hosts={num_hosts} and --devices_per_host={devices_per_host} must be >= 1."
        )
    gin_config.parse(gin_files, gin_bindings)
    gin_config.build(ModelConfig)
    gin_config.build(CheckpointConfig)
    train_config = gin_config.build(TrainConfig)
    num_devices = num_hosts * devices_per_host
    try:
        shape = sharding.resolve_mesh_shape(train_config.mesh_shape, num_devices)
    except UserError as error:
        raise UserError(
            f"--num_hosts={num_hosts} x --devices_per_host={devices_per_host} = {num_devices} "
            f"devices cannot fill the mesh: {error} Change train.mesh_shape or the host and "
            "device counts."
        ) from None
    batch_shards = shape[0] * shape[1]
    if train_config.batch_size % batch_shards or train_config.batch_size % num_hosts:
        raise UserError(
            f"train.batch_size={train_config.batch_size} must be divisible by the mesh's batch "
            f"axes (data x fsdp = {batch_shards}) and by --num_hosts={num_hosts}."
        )
    # Prepared once here: N hosts preparing the same cache at once would race.
    ensure_prepared(gin_config.build(DataConfig), log=log)
    return train_config


def _child_env(env_vars: dict) -> dict:
    env = dict(os.environ)
    # Each host gets its CPU device count from CIRRUS_CPU_DEVICES, not an inherited flag.
    xla_flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    env["XLA_FLAGS"] = " ".join(xla_flags)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [gin_config.ROOT, env.get("PYTHONPATH")]))
    env.update(env_vars)
    return env


def _pump(stream, host: int, path: str, lock: threading.Lock):
    """Copies one host's output to the console ([host i] prefix) and its log file."""
    with open(path, "a", buffering=1) as log_file:
        for line in stream:
            log_file.write(line)
            with lock:
                sys.stdout.write(f"[host {host}] {line}")
                sys.stdout.flush()
    stream.close()


_PR_SET_PDEATHSIG = 1
try:
    _LIBC = ctypes.CDLL(None, use_errno=True)
    _LIBC.prctl  # noqa: B018 - Linux only; elsewhere hosts rely on pids.json cleanup.
except (OSError, AttributeError):
    _LIBC = None


def _die_with_launcher() -> None:
    """Runs in each host between fork and exec: SIGTERM when the launcher dies."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def command_line(pid: int) -> str | None:
    """A live process's command line (space-joined), None if there is no such process."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return None
    except OSError:  # No /proc (macOS): ask ps.
        result = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True)
        return result.stdout.decode(errors="replace").strip() or None


def stop_leftovers(logs: str, workdir: str, grace_s: float, log=print) -> list[int]:
    """Stops the hosts an earlier launch.local on this workdir left running (pids.json; a pid
    counts only while its command line is launch.train on this workdir). Refuses, naming
    it, while the launcher that started them still runs. Returns the pids it stopped."""
    path = os.path.join(logs, "pids.json")
    try:
        with open(path) as pid_file:
            record = json.load(pid_file)
    except (OSError, ValueError):
        return []
    launcher = record.get("launcher_pid")
    if isinstance(launcher, int) and launcher != os.getpid():
        line = command_line(launcher)
        if line and "launch.local" in line:
            raise UserError(
                f"launch.local pid {launcher} is still running a job in this workdir ({path}): "
                f"{line.strip()[:200]}. Stop it first (kill {launcher}: its hosts save and "
                "exit), or use another --workdir."
            )
    leftovers = []
    for pid in record.get("pids", []):
        line = command_line(pid) if isinstance(pid, int) else None
        if line and "launch.train" in line and f"--workdir={workdir}" in line:
            leftovers.append(pid)
    if not leftovers:
        return []
    log(
        f"launch.local: stopping host processes {leftovers} left running by an earlier "
        f"launcher of this workdir (run {record.get('run_id')}, attempt {record.get('attempt')})"
    )
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(command_line(pid) for pid in leftovers):
        time.sleep(0.1)
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    return leftovers


def start_job(command, num_hosts, devices_per_host, run_id, logs, attempt) -> Job:
    os.makedirs(logs, exist_ok=True)
    port = free_port()
    lock = threading.Lock()
    processes, readers = [], []
    for host in range(num_hosts):
        env = _child_env(distributed.local_env(port, num_hosts, host, devices_per_host, run_id))
        path = os.path.join(logs, f"host_{host}.log")
        with open(path, "a") as log_file:
            log_file.write(f"=== run {run_id} attempt {attempt} ===\n")
        process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # Its own process group: killpg reaches its children.
            preexec_fn=_die_with_launcher,
        )
        reader = threading.Thread(target=_pump, args=(process.stdout, host, path, lock))
        reader.daemon = True
        reader.start()
        processes.append(process)
        readers.append(reader)
    record = {
        "run_id": run_id,
        "attempt": attempt,
        "launcher_pid": os.getpid(),
        "pids": [p.pid for p in processes],  # Each also its process group's id.
    }
    path = os.path.join(logs, "pids.json")
    with open(path + ".tmp", "w") as pid_file:
        json.dump(record, pid_file)
    os.replace(path + ".tmp", path)
    return Job(processes, readers, [None] * num_hosts, [])


def _signal_groups(job: Job, signum: int):
    for process in job.processes:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signum)


def stop_job(job: Job, grace_s: float, log=print):
    """SIGTERM to every live host, SIGKILL of every process group after the grace period."""
    for process in job.processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(p.poll() is None for p in job.processes):
        time.sleep(0.05)
    if any(p.poll() is None for p in job.processes):
        log(f"launch.local: hosts still running after {grace_s:.0f}s; SIGKILL")
    _signal_groups(job, signal.SIGKILL)
    for process in job.processes:
        process.wait()


class _StopRequest:
    """SIGTERM / SIGINT to the launcher: forward a preemption notice, do not restart; a
    second one: kill every host now."""

    def __init__(self):
        self.requested = False
        self.count = 0

    def install(self):
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        self.count += 1


def wait_job(job: Job, grace_s: float, stop: _StopRequest, log=print) -> int:
    """Waits for every host; the first failure stops them all. Returns the job's code."""
    forwarded_at = None
    preempted_at = None
    while True:
        for host, process in enumerate(job.processes):
            if job.codes[host] is None and process.poll() is not None:
                job.codes[host] = exit_code(process.returncode)
                job.order.append(host)
                if job.codes[host] not in (0, cli.EXIT_PREEMPTED):
                    log(
                        f"launch.local: host {host} exited with code {job.codes[host]}; "
                        "stopping every host"
                    )
                    stop_job(job, grace_s, log)
                    _fill_codes(job)
                    return job_code(job.codes, job.order)
                if job.codes[host] == cli.EXIT_PREEMPTED and preempted_at is None:
                    preempted_at = time.monotonic()
        if all(code is not None for code in job.codes):
            _signal_groups(job, signal.SIGKILL)  # Leftover children, if any.
            return job_code(job.codes, job.order)
        if stop.count > 1:
            log("launch.local: second stop request; killing every host's process group")
            stop_job(job, 0.0, log)
            _fill_codes(job)
            return job_code(job.codes, job.order)
        if stop.requested and forwarded_at is None:
            log("launch.local: stop requested; sending SIGTERM to every host's process group")
            for process in job.processes:
                if process.poll() is None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(process.pid, signal.SIGTERM)
            forwarded_at = time.monotonic()
        started = min(t for t in (forwarded_at, preempted_at, float("inf")) if t is not None)
        if time.monotonic() - started > grace_s:
            log(f"launch.local: hosts did not finish within {grace_s:.0f}s of a preemption")
            stop_job(job, 0.0, log)
            _fill_codes(job)
            return job_code(job.codes, job.order)
        time.sleep(0.05)


def _fill_codes(job: Job):
    for host, process in enumerate(job.processes):
        if job.codes[host] is None:
            job.codes[host] = exit_code(process.wait())
            job.order.append(host)


def supervise(
    command,
    *,
    num_hosts: int,
    devices_per_host: int,
    run_id: str,
    logs: str,
    preemption_budget: int,
    failure_budget: int,
    grace_s: float,
    log=print,
) -> int:
    """Runs the job, restarting it per the budgets; returns the final exit code."""
    stop = _StopRequest().install()
    preemptions = failures = 0
    attempt = 0
    while True:
        log(
            f"launch.local: run {run_id} attempt {attempt}: {num_hosts} hosts x "
            f"{devices_per_host} devices; logs in {logs}"
        )
        job = start_job(command, num_hosts, devices_per_host, run_id, logs, attempt)
        try:
            code = wait_job(job, grace_s, stop, log)
        finally:  # Whatever ends the wait, no host outlives it.
            _signal_groups(job, signal.SIGKILL)
        for reader in job.readers:
            reader.join(timeout=5)
        log(f"launch.local: attempt {attempt} ended with code {code} (hosts: {job.codes})")
        if code in (0, cli.EXIT_USER_ERROR) or stop.requested:
            return code
        if code in RESTART_CODES:
            if preemptions >= preemption_budget:
                log(f"launch.local: preemption budget ({preemption_budget}) used up")
                return code
            preemptions += 1
        else:
            if failures >= failure_budget:
                return code
            failures += 1
        attempt += 1
        log("launch.local: restarting from the last checkpoint in the same workdir")


def _log(message: str) -> None:
    print(message, flush=True)


def main(argv):
    workdir = cli.WORKDIR.value
    if not workdir:
        raise UserError("--workdir is required: the directory every host shares.")
    if "://" not in workdir:
        workdir = os.path.abspath(workdir)
    validate(
        NUM_HOSTS.value,
        DEVICES_PER_HOST.value,
        cli.GIN_FILES.value,
        cli.GIN_BINDINGS.value,
        log=_log,
    )
    run_id = RUN_ID.value or default_run_id(workdir)
    stop_leftovers(log_dir(workdir, run_id), workdir, GRACE_S.value, log=_log)
    command = (
        [sys.executable, "-m", "launch.train", f"--workdir={workdir}"]
        + [f"--gin_file={path}" for path in cli.GIN_FILES.value]
        + [f"--gin_bindings={binding}" for binding in cli.GIN_BINDINGS.value]
        + list(argv[1:])
    )
    code = supervise(
        command,
        num_hosts=NUM_HOSTS.value,
        devices_per_host=DEVICES_PER_HOST.value,
        run_id=run_id,
        logs=log_dir(workdir, run_id),
        preemption_budget=PREEMPTION_BUDGET.value,
        failure_budget=FAILURE_BUDGET.value,
        grace_s=GRACE_S.value,
        log=_log,
    )
    sys.exit(min(code, 254))  # Never 255: gcloud re-runs a command whose ssh exits 255.


if __name__ == "__main__":
    app.run(cli.guarded(main))
