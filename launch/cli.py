"""Shared flags and the exit-code contract of every launch entry point.

Exit codes: 0 done, 1 user error (message, no traceback), 42 preempted (checkpoint saved).
Never 255: gcloud re-runs a command whose ssh exits 255.
"""

import math
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


def guarded(main):
    """Wraps an absl main: a UserError prints its message and exits 1; crashes never exit 255."""

    def wrapper(argv):
        try:
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
