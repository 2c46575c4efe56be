"""TensorBoard event files beside a run's ``train.log`` (``tensorboard --logdir RUN_DIR``).

Written by rank 0 only. Without the ``tensorboard`` package (``pip install flipctr[tensorboard]``)
(or with one that fails to load) the run says so once in its log and writes no event files.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .distributed import is_main

log = logging.getLogger("flipctr")


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
