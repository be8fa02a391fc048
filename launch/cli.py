"""Shared flags and the exit-code contract of every launch entry point.

Exit codes: 0 done, 1 user error (message, no traceback), 42 preempted (checkpoint saved).
Never 255: gcloud re-runs a command whose ssh exits 255.
"""

import io
import math
import os
import re
import sys
import traceback

from absl import flags, logging

from research.errors import UserError

EXIT_USER_ERROR = 1
EXIT_PREEMPTED = 42

GIN_FILES = flags.DEFINE_multi_string("gin_file", [], "Gin config file; repeatable.")
GIN_BINDINGS = flags.DEFINE_multi_string(
    "gin_bindings", [], "Gin binding such as 'train.num_steps=200'; repeatable."
)
WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, metrics.")
SHOW_LIBRARY_LOGS = flags.DEFINE_bool(
    "show_library_logs",
    False,
    "Print the libraries' INFO logs (Orbax, JAX, uvicorn, ...) on the console too; by default "
    "the console shows Cirrus's own lines and warnings, and the INFO logs go to "
    "WORKDIR/logs/<entry point>.log.",
)
COMPILATION_CACHE_ENV = "CIRRUS_COMPILATION_CACHE"


def parse_mesh_shape(text: str, flag: str = "--mesh_shape") -> tuple[int, int, int]:
    """'1,-1,1' or '(1, -1, 1)' -> (1, -1, 1): sizes over (data, fsdp, tensor), -1 = the rest."""
    try:
        shape = tuple(int(p) for p in re.split(r"[\s,()\[\]]+", text) if p)
    except ValueError:
        shape = ()
    if len(shape) != 3 or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise UserError(
            f"{flag}={text!r} must be three comma-separated sizes over (data, fsdp, tensor), "
            "at most one of them -1 (the rest), e.g. 1,-1,1 or 1,1,2."
        )
    return shape


def device_mesh(value: str | None, flag: str = "--mesh_shape"):
    """A (data, fsdp, tensor) mesh over the first devices the flag's sizes need (-1 = the
    rest of them); None for an empty flag (one device, no mesh)."""
    if not value:
        return None
    shape = parse_mesh_shape(value, flag)
    import jax

    from research import sharding

    devices = jax.devices()
    if -1 not in shape:
        if math.prod(shape) > len(devices):
            raise UserError(
                f"{flag}={value!r} needs {math.prod(shape)} devices but {len(devices)} are "
                "available."
            )
        devices = devices[: math.prod(shape)]
    try:
        return sharding.make_mesh(shape, devices=devices)
    except UserError as error:
        raise UserError(f"{flag}={value!r}: {error}") from None


def setup_logging(entry: str, workdir: str | None) -> str | None:
    """The console shows Cirrus's own lines (printed) and WARNING+ log records; every INFO
    record also goes to WORKDIR/logs/<entry>.log (a local workdir; per host past the first).
    --show_library_logs puts INFO on the console too. Returns the log file's path, if any."""
    import logging as std_logging

    logging.set_verbosity(logging.INFO)
    console = logging.get_absl_handler()
    console.setLevel(std_logging.INFO if SHOW_LIBRARY_LOGS.value else std_logging.WARNING)
    if not workdir or "://" in workdir or workdir.endswith(".gguf"):
        return None
    host = os.environ.get("CIRRUS_PROCESS_ID", "0")
    name = entry if host in ("", "0") else f"{entry}_host{host}"
    directory = os.path.join(workdir, "logs")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return None
    path = os.path.join(directory, f"{name}.log")
    handler = std_logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(std_logging.INFO)
    handler.setFormatter(std_logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    std_logging.getLogger().addHandler(handler)
    return path


def show_on_console(logger_name: str) -> None:
    """INFO records of `logger_name` reach the console (stderr) at the default verbosity:
    `setup_logging` lets only WARNING+ through the console handler (INFO goes to the log
    file) unless --show_library_logs, which shows them already."""
    import logging as std_logging

    logger = std_logging.getLogger(logger_name)
    logger.setLevel(std_logging.INFO)
    if SHOW_LIBRARY_LOGS.value:
        return
    handler = std_logging.StreamHandler(sys.stderr)
    handler.setLevel(std_logging.INFO)
    handler.setFormatter(std_logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    logger.addHandler(handler)


def enable_compilation_cache() -> None:
    """XLA's persistent compilation cache, so a restart compiles nothing it compiled before:
    $CIRRUS_COMPILATION_CACHE, default ~/.cache/cirrus/xla ("off" turns it off)."""
    import jax

    directory = os.environ.get(COMPILATION_CACHE_ENV) or os.path.expanduser("~/.cache/cirrus/xla")
    if directory == "off":
        return
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


class _Console(io.TextIOBase):
    """stdout / stderr that go quiet instead of raising once their reader is gone: a host of
    launch.local whose launcher was killed (its pipe closed) still saves and exits 42 on the
    parent-death SIGTERM, and `launch.sample ... | head` ends without a BrokenPipeError."""

    def __init__(self, stream):
        self._stream, self._gone = stream, False

    def write(self, text: str) -> int:
        if not self._gone:
            try:
                return self._stream.write(text)
            except (BrokenPipeError, ValueError):  # ValueError: the file was closed.
                self._gone = True
        return len(text)

    def flush(self) -> None:
        if not self._gone:
            try:
                self._stream.flush()
            except (BrokenPipeError, ValueError):
                self._gone = True

    def writable(self) -> bool:
        return True

    def __getattr__(self, name):  # fileno, encoding, isatty, ...: the real stream's.
        return getattr(self._stream, name)


def quiet_when_console_gone() -> None:
    """Wraps sys.stdout and sys.stderr in _Console (once)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _Console):
            setattr(sys, name, _Console(stream))


def guarded(main, *, logs_in_workdir: bool = True):
    """Wraps an absl main: a UserError prints its message and exits 1; crashes never exit 255.
    Logging is set up first (`setup_logging`); `logs_in_workdir=False` for entry points whose
    --workdir is only read (nothing is created there; INFO logs stay off the console)."""

    def wrapper(argv):
        try:
            entry = main.__module__.rsplit(".", 1)[-1]
            if entry == "__main__":
                entry = os.path.splitext(os.path.basename(sys.argv[0]))[0]
            workdir = WORKDIR.value if WORKDIR.present or WORKDIR.value else None
            workdir = workdir if logs_in_workdir else None
            quiet_when_console_gone()
            setup_logging(entry, workdir)
            return main(argv)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            sys.exit(130)
        except SystemExit:
            raise
        except BaseException:
            logging.flush()
            traceback.print_exc()
            sys.exit(2)

    return wrapper
