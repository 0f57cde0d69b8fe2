"""Named points where fault-injection tests stop a run, so they can kill it at an exact moment instead of racing a
stage that may last a fraction of a second.

``RESTORELCC_FAILPOINTS="checkpoint:training:20,evaluated:restored:1"``: a run reaching one of the named points
stops itself with SIGSTOP; the test sees the process stopped and kills it with -9. Without the variable (every
production run) ``reach`` does nothing.

Points: ``checkpoint:<point>`` and ``checkpoint:<point>:<step>`` after a checkpoint is written;
``evaluated:<which>:<n>`` after the ``n``-th evaluation set of the dense/pruned/restored model is noted.
"""

from __future__ import annotations

import logging
import os
import signal

ENV = "RESTORELCC_FAILPOINTS"

log = logging.getLogger("restorelcc.failpoints")


def armed(name: str) -> bool:
    return name in {n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip()}


def reach(name: str) -> None:
    """Stop this process here if the test armed ``name``."""
    if armed(name):
        log.warning("stopping at failpoint %s (%s is for fault-injection tests only)", name, ENV)
        os.kill(os.getpid(), signal.SIGSTOP)
