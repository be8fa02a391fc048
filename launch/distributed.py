"""The one environment contract between a launcher and `launch.train`: jax.distributed init.

Every backend (launch.local, launch.pod, a hand-written script) starts `launch.train` on each
host with these variables; `initialize()` runs first thing in launch.train's main, before any
JAX computation:

  CIRRUS_COORDINATOR      host:port of process 0's coordinator, e.g. 127.0.0.1:4711. Set =
                          an explicit cluster; TPU-pod auto-detection is switched off
                          (cluster_detection_method="deactivate"). A 127.0.0.1 / localhost
                          coordinator also binds to 127.0.0.1 only.
  CIRRUS_NUM_PROCESSES    number of processes (hosts) in the job; required with COORDINATOR.
  CIRRUS_PROCESS_ID       this process's index in [0, NUM_PROCESSES); required with COORDINATOR.
  CIRRUS_CPU_DEVICES      CPU devices per process (jax_num_cpu_devices); local runs only.
  CIRRUS_DISTRIBUTED=auto jax.distributed.initialize() with JAX's own cluster detection
                          (TPU VM pods, GKE); set by launch.pod's per-worker script.
  CIRRUS_RUN_ID           the run's id, the same across restarts (logs, pid files); optional.
  CIRRUS_INIT_TIMEOUT_S   seconds to wait for every process to join (default 300).

With none of them set, the run is a single process and nothing is initialized.
"""

import os
import sys

from research.errors import UserError

COORDINATOR = "CIRRUS_COORDINATOR"
NUM_PROCESSES = "CIRRUS_NUM_PROCESSES"
PROCESS_ID = "CIRRUS_PROCESS_ID"
CPU_DEVICES = "CIRRUS_CPU_DEVICES"
DISTRIBUTED = "CIRRUS_DISTRIBUTED"
RUN_ID = "CIRRUS_RUN_ID"
INIT_TIMEOUT_S = "CIRRUS_INIT_TIMEOUT_S"

_LOOPBACK = ("127.0.0.1", "localhost")


def local_env(
    coordinator_port: int, num_processes: int, process_id: int, cpu_devices: int, run_id: str
) -> dict[str, str]:
    """The variables launch.local sets for process `process_id` of a job on this machine."""
    return {
        COORDINATOR: f"127.0.0.1:{coordinator_port}",
        NUM_PROCESSES: str(num_processes),
        PROCESS_ID: str(process_id),
        CPU_DEVICES: str(cpu_devices),
        RUN_ID: run_id,
    }


def _int_env(environ, name: str) -> int:
    value = environ.get(name)
    if value is None:
        raise UserError(
            f"{COORDINATOR} is set but {name} is not; set both (see launch/distributed.py)."
        )
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name}={value!r} must be an integer.") from None


def initialize(environ=None, log=print) -> None:
    """Initializes jax.distributed (and the CPU device count) from the environment contract.

    Must run before JAX creates its backends. A no-op without CIRRUS_* variables.
    """
    environ = os.environ if environ is None else environ
    import jax

    cpu_devices = environ.get(CPU_DEVICES)
    if cpu_devices:
        jax.config.update("jax_num_cpu_devices", int(cpu_devices))
    timeout = int(environ.get(INIT_TIMEOUT_S, "300"))
    if environ.get(DISTRIBUTED) == "auto":
        jax.distributed.initialize(initialization_timeout=timeout)
        return
    coordinator = environ.get(COORDINATOR)
    if not coordinator:
        return
    num_processes = _int_env(environ, NUM_PROCESSES)
    process_id = _int_env(environ, PROCESS_ID)
    if not 0 <= process_id < num_processes:
        raise UserError(
            f"{PROCESS_ID}={process_id} must be in [0, {NUM_PROCESSES}={num_processes})."
        )
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"{COORDINATOR}={coordinator!r} must be host:port, e.g. 127.0.0.1:4711.")
    bind = f"127.0.0.1:{port}" if host in _LOOPBACK else None
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        coordinator_bind_address=bind,
        cluster_detection_method="deactivate",
        initialization_timeout=timeout,
    )
    log(
        f"jax.distributed: process {process_id}/{num_processes} via {coordinator} "
        f"(run {environ.get(RUN_ID, '-')})"
    )


def is_chief() -> bool:
    """True on process 0 (the one that writes shared files)."""
    import jax

    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches this point (a no-op for one process)."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def exit_promptly(main):
    """Wraps an absl main (after cli.guarded): a failing process of a multi-process job exits
    at once. A normal exit waits in jax.distributed's shutdown barrier for every other
    process, which a host stuck in a collective never reaches; the launcher would then
    wait minutes to learn of the failure. Done (0) and preempted (42) exit normally: every
    host gets there together."""

    def wrapper(argv):
        try:
            return main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            if code not in (0, 42) and _is_initialized():
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
            raise

    return wrapper


def _is_initialized() -> bool:
    import jax

    return jax.distributed.is_initialized()
