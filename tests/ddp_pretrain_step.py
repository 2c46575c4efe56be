"""One FLIP pretraining step under DDP (run by test_ddp.py through torchrun, gloo backend)."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from test_ddp import collective_threads  # noqa: E402
from test_flip import _pretrain_split, _tiny_pair  # noqa: E402

from flipctr.runtime.device import Runtime
from flipctr.config import PretrainConfig  # noqa: E402
from flipctr.training.pretrain import Pretrainer  # noqa: E402
from flipctr.runtime.distributed import init_distributed, leave


def main() -> None:
    init_distributed("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, backbone, lm = _tiny_pair()
    before = backbone.embedding.weight.detach().clone()
    losses = []
    cfg = PretrainConfig(lr=1e-2, batch_size=4, epochs=1, progress=False, amp="off")
    # 11 rows over 2 ranks: shards padded to 6 rows each, so 2 steps of 4 and 2 rows on every rank
    # (unequal shards would leave one rank a step short and its collectives unmatched)
    Pretrainer(cfg, Runtime.of(cfg, "cpu"), Path(sys.argv[1])).fit(
        model, _pretrain_split(11), on_step=lambda e, s, loss: losses.append(loss))
    assert len(losses) == 2, losses
    assert not torch.equal(before, backbone.embedding.weight)
    # gradients were averaged: every rank holds the same weights after the step
    for p in (backbone.embedding.weight, lm.encoder.embeddings.word_embeddings.weight):
        gathered = [torch.empty_like(p) for _ in range(world)]
        dist.all_gather(gathered, p.detach())
        assert all(torch.equal(gathered[0], g) for g in gathered)
    print(f"rank {rank}: loss {losses[0]:.4f} ok", flush=True)
    leave()
    # the group is gone with its threads, though torch._dynamo (which the first optimizer
    # imports) came after it was created and a collective's tensors were released last
    assert not collective_threads(), collective_threads()
    print(f"rank {rank}: no collective thread left ok", flush=True)


if __name__ == "__main__":
    main()
