"""One FLIP pretraining step under DDP on half of a global batch per rank (run by test_ddp.py
through torchrun, gloo): the loss and the averaged gradients must equal those of one process
on the whole batch, which test_ddp.py computed and saved in argv[1]."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from test_ddp import collective_threads, deterministic_pair  # noqa: E402
from flipctr.runtime.distributed import init_distributed, leave


def main() -> None:
    backend = sys.argv[2] if len(sys.argv) > 2 else "gloo"  # "nccl": one GPU per rank
    init_distributed(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    ref = torch.load(sys.argv[1], weights_only=True)
    model = deterministic_pair().to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    rows = len(ref["ids"]) // world
    part = {k: ref[k][rank * rows:(rank + 1) * rows].to(device)
            for k in ("ids", "input_ids", "attention_mask", "value_spans")}
    out = ddp(**part)
    out.loss.backward()
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    torch.testing.assert_close(loss.cpu() / world, ref["loss"], atol=1e-5, rtol=1e-5)
    grads = {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(ref["grads"]), set(grads) ^ set(ref["grads"])
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref["grads"][name], atol=1e-5, rtol=1e-5, msg=name)
    print(f"rank {rank}: loss and {len(grads)} gradients equal ok", flush=True)
    # the wrapper holds the process group: released first, or the group's threads outlive leave()
    # and the interpreter's exit can deadlock on them (as the engine releases its own wrapper)
    del ddp, out
    leave()
    assert not collective_threads(), collective_threads()
    print(f"rank {rank}: no collective thread left ok", flush=True)


if __name__ == "__main__":
    main()
