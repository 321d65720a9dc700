"""`python tests/dist_kill_wrapper.py train ...` = `python -m ibot_engine train ...`, except that in the first attempt
of a torchrun job (TORCHELASTIC_RESTART_COUNT=0) rank IBOT_TEST_KILL_RANK sends itself SIGKILL just before optimizer
step IBOT_TEST_KILL_AT runs: a real `kill -9` of one rank at a known point, with no hook in the engine."""

from __future__ import annotations

import faulthandler
import os
import signal
import sys

import ibot_engine.train.loop as train_module
from ibot_engine.cli import main

if os.environ.get("IBOT_TEST_STACKS"):  # debugging aid: every thread's stack if still running after 120 s
    _stacks = open(f"{os.environ['IBOT_TEST_STACKS']}.r{os.environ.get('RANK')}.a"  # noqa: SIM115
                   f"{os.environ.get('TORCHELASTIC_RESTART_COUNT')}", "w")
    faulthandler.dump_traceback_later(120, file=_stacks)

if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and os.environ.get("RANK") == os.environ.get(
    "IBOT_TEST_KILL_RANK", "1"
):
    kill_at = int(os.environ["IBOT_TEST_KILL_AT"])
    inner = train_module.train_step

    def train_step(t, *args, **kwargs):
        if t.step + 1 == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return inner(t, *args, **kwargs)

    train_module.train_step = train_step

if __name__ == "__main__":
    sys.exit(main())
