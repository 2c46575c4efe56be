"""Time budgets under DDP (run by test_ddp.py through torchrun, gloo): each rank's clock runs at
its own pace (rank 1 twice as slow as rank 0), so alone the ranks would stop at different
points and the next collective would hang; they agree on the earliest stop. Each rank writes
where it stopped into argv[1]."""

import json
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from test_ddp import collective_threads, finetune_setup  # noqa: E402
from test_flip import _pretrain_split, _tiny_pair  # noqa: E402

from flipctr.runtime.device import Runtime
from flipctr.config import PretrainConfig  # noqa: E402
from flipctr.training import budget  # noqa: E402
from flipctr.training.pretrain import Pretrainer  # noqa: E402
from flipctr.runtime.distributed import init_distributed, leave


def main() -> None:
    init_distributed("gloo")
    rank, out = dist.get_rank(), Path(sys.argv[1])
    now, pace = [0.0], 1.0 + rank
    budget.clock = lambda: now[0]

    model, trainer, train, valid = finetune_setup(batch_size=16)
    trainer.cfg.epochs, trainer.cfg.evals_per_epoch, trainer.cfg.patience, trainer.cfg.max_seconds = 100, 2, 1000, 35
    evaluate = trainer.evaluate

    def slow_evaluate(m, split):  # 10 s (rank 0) or 20 s (rank 1) up to each evaluation
        now[0] += 10 * pace
        return evaluate(m, split)

    trainer.evaluate = slow_evaluate
    fit = trainer.fit(model, train, eval_split=valid)

    now[0], steps = 0.0, []

    def on_step(epoch, step, loss):
        now[0] += pace
        steps.append((epoch, step))

    cfg = PretrainConfig(lr=1e-2, batch_size=2, epochs=5, progress=False, amp="off", max_seconds=30)
    pretrain_model, _, _ = _tiny_pair()
    Pretrainer(cfg, Runtime.of(cfg, "cpu"), out / "pretrain").fit(pretrain_model, _pretrain_split(), on_step=on_step)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "evals": [e["epoch"] for r in fit.history for e in r.evals], "stopped": fit.stopped, "steps": len(steps)}))
    leave()
    assert not collective_threads(), collective_threads()  # the group's threads are gone


if __name__ == "__main__":
    main()
