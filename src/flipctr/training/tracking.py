"""What a run records: its log (:func:`setup_logging`) and TensorBoard event files beside it
(``tensorboard --logdir RUN_DIR``).

Written by rank 0 only. Without the ``tensorboard`` package (``pip install flipctr[tensorboard]``)
(or with one that fails to load) the run says so once in its log and writes no event files.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from ..runtime.distributed import is_main

log = logging.getLogger("flipctr")


def setup_logging(log_file: Path) -> None:
    """The ``flipctr`` log to ``log_file`` (a run folder's ``train.log``) and to stderr."""
    log.setLevel(logging.INFO)
    for handler in list(log.handlers):
        log.removeHandler(handler)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for handler in (logging.FileHandler(log_file), logging.StreamHandler(sys.stderr)):
        handler.setFormatter(fmt)
        log.addHandler(handler)
    log.propagate = False


class Tracker:
    """Scalars by tag and integer step (optimizer steps), e.g. ``train/loss``, ``valid/auc``."""

    def __init__(self, folder: Path | None):
        self.writer = None
        if folder is None or not is_main():
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(folder))
        except ImportError:
            log.info("tensorboard not installed: no event files in %s (pip install 'flipctr[tensorboard]')", folder)
        except Exception as err:  # noqa: BLE001 - an installed but broken TensorBoard must not stop training
            log.warning("tensorboard unusable (%s: %s): no event files in %s", type(err).__name__, err, folder)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, float(value), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
