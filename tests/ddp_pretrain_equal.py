"""The real Pretrainer under DDP (run by test_ddp.py through torchrun, gloo): two ranks with
batch 4 each, MTM on and fields masked at random; rank 0 writes the weights into argv[1] for
comparison with one process with batch 8."""

import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from test_ddp import collective_threads, deterministic_pair, distinct_split, PRETRAIN_EQUAL  # noqa: E402

from flipctr.runtime.device import Runtime
from flipctr.config import PretrainConfig  # noqa: E402
from flipctr.training.pretrain import Pretrainer  # noqa: E402
from flipctr.runtime.distributed import init_distributed, leave


def main() -> None:
    init_distributed("gloo")
    cfg = PretrainConfig(lr=1e-3, batch_size=4, epochs=2, progress=False, amp="off")
    Pretrainer(cfg, Runtime.of(cfg, "cpu"), Path(sys.argv[1])).fit(deterministic_pair(**PRETRAIN_EQUAL),
                                                               distinct_split(16))
    print(f"rank {dist.get_rank()} ok", flush=True)
    leave()
    assert not collective_threads(), collective_threads()  # the group's threads are gone


if __name__ == "__main__":
    main()
