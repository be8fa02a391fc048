"""`launch.serve` with a fault injected into its Sampler, for tests/serving/test_robustness.py.

  CIRRUS_FAULT=hang python -m tests.serving.fault_serve [launch.serve flags]

hang: every decode call after the warm-up's blocks forever (a wedged device call), so the
engine's watchdog must fail the engine and the process must exit non-zero by itself.
slow: every decode call after the warm-up's takes 0.5 s longer (a request that outlasts a
SIGTERM's drain).
"""

import os
import threading
import time

from absl import app

from launch import cli, serve
from research.serving.core.sampler import Sampler

_FAULT = os.environ.get("CIRRUS_FAULT", "")
_calls = {"generate": 0}
_never = threading.Event()
_generate = Sampler.generate


def _faulty_generate(self, state, **kwargs):
    _calls["generate"] += 1
    if _FAULT == "hang" and _calls["generate"] > 1:  # The first call is the warm-up's.
        _never.wait()
    if _FAULT == "slow" and _calls["generate"] > 1:
        time.sleep(0.5)
    return _generate(self, state, **kwargs)


Sampler.generate = _faulty_generate

if __name__ == "__main__":
    app.run(cli.guarded(serve.main))
