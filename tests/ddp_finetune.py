"""Finetuning under DDP (run by test_ddp.py through torchrun, gloo): each rank trains on its
shard of every batch and evaluates its share of the eval rows; rank 0 saves the trained
weights and both ranks the gathered scores into argv[1], for comparison with one process."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from test_ddp import collective_threads, finetune_setup  # noqa: E402

from flipctr.training.trainer import predict  # noqa: E402
from flipctr.runtime.distributed import init_distributed, leave


def main() -> None:
    init_distributed("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, trainer, train, valid = finetune_setup(batch_size=16)  # 2 ranks x 16 = one global batch of 32
    fit = trainer.fit(model, train, eval_split=valid)
    scores = predict(model, valid)
    torch.save({"state": model.state_dict(), "scores": torch.from_numpy(scores), "best": fit.best_eval},
               Path(sys.argv[1]) / f"rank{rank}.pt")
    print(f"rank {rank} of {world} ok", flush=True)
    leave()
    # the group is gone with its threads, though torch._dynamo (which the first optimizer
    # imports) came after it was created and a collective's tensors were released last
    assert not collective_threads(), collective_threads()
    print(f"rank {rank}: no collective thread left ok", flush=True)


if __name__ == "__main__":
    main()
