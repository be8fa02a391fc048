"""The step watchdog and the single-process preemption check of research/train/loop.py."""

import subprocess
import sys

from launch.config import ROOT
from research.train.loop import PreemptionNotice, _preemption_agreed

_HANG = """
import time
from research.train.loop import Watchdog
watchdog = Watchdog(0.5)
watchdog.beat()
time.sleep(0.2)
watchdog.beat()  # Progress: no exit yet.
time.sleep(30)  # A hung step.
"""


def test_watchdog_dumps_every_stack_and_exits():
    result = subprocess.run(
        [sys.executable, "-c", _HANG], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 3, result.stderr[-2000:]
    assert "watchdog: no training step completed in 0.5s" in result.stdout
    assert "in _watch" in result.stderr  # The watchdog's own thread...
    assert 'File "<string>", line 8 in <module>' in result.stderr  # ...and the hung one.


def test_watchdog_off_and_local_preemption_flag():
    notice = PreemptionNotice()
    assert not _preemption_agreed(notice, step=5, every=1)
    assert not _preemption_agreed(None, step=5, every=1)
    notice.requested = True
    assert _preemption_agreed(notice, step=5, every=4)  # One process: no need to wait.
