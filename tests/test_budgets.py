"""Wall-clock budgets on a clock the tests drive: pretraining sizes its cosine schedule to the
steps that fit and stops mid-epoch with a checkpoint; a finetuning stage stops at the
evaluation after which the next would come past its budget."""

import pytest
import torch

from flipctr.runtime.device import Runtime
from flipctr.config import PretrainConfig
from flipctr.models.backbones import build_model
from flipctr.training import budget
from flipctr.training.optim import CosineSchedule
from flipctr.training.pretrain import Pretrainer
from flipctr.training.trainer import Trainer

from conftest import tiny_config
from test_flip import _pretrain_split, _tiny_pair
from test_training import _toy_splits


@pytest.fixture
def clock(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(budget, "clock", lambda: now[0])
    return now


def test_cosine_schedule_total_is_kept_by_the_schedulers_state():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = CosineSchedule(0, 100)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    schedule.total = 40
    restored = CosineSchedule(0, 100)
    torch.optim.lr_scheduler.LambdaLR(opt, restored).load_state_dict(scheduler.state_dict())
    assert restored.total == 40 and restored(20) == pytest.approx(0.5) and restored(40) == 0.0


def test_pretraining_budget_sizes_the_schedule_and_stops_mid_epoch(clock, tmp_path):
    # 24 rows in batches of 2: 12 steps an epoch, 60 planned; each step takes 1 s on the clock
    cfg = PretrainConfig(lr=1e-2, batch_size=2, epochs=5, progress=False, amp="off", max_seconds=30)
    steps = []

    def on_step(epoch, step, loss):
        clock[0] += 1.0
        steps.append((epoch, step))

    model, _, _ = _tiny_pair()
    history = Pretrainer(cfg, Runtime.of(cfg, "cpu"), tmp_path).fit(model, _pretrain_split(), on_step=on_step)
    # measured from step 3 to 13 (1 step/s), 17 s left, 3 % kept: 16 more steps -> 29 in all
    assert len(steps) == 29 and steps[-1] == (3, 4)
    assert [r["steps"] for r in history] == [12, 12, 5]
    assert history[-1]["stopped_by_budget"] and not any("stopped_by_budget" in r for r in history[:-1])
    assert history[-1]["lr"] == 0.0  # the cosine schedule ends where the budget does
    assert history[-1]["rows"] == 10
    # the stop is checkpointed: resuming trains no further
    model, _, _ = _tiny_pair()
    again = Pretrainer(cfg, Runtime.of(cfg, "cpu"), tmp_path).fit(model, _pretrain_split(), resume=True,
                                                               on_step=on_step)
    assert len(steps) == 29 and again == history


def test_pretraining_within_its_budget_runs_every_epoch(clock, tmp_path):
    cfg = PretrainConfig(lr=1e-2, batch_size=2, epochs=2, progress=False, amp="off", max_seconds=1000)
    model, _, _ = _tiny_pair()
    history = Pretrainer(cfg, Runtime.of(cfg, "cpu"), tmp_path).fit(
        model, _pretrain_split(), on_step=lambda *_: clock.__setitem__(0, clock[0] + 1.0))
    assert [r["steps"] for r in history] == [12, 12] and not any("stopped_by_budget" in r for r in history)


def test_finetuning_stops_before_the_evaluation_past_its_budget(clock, monkeypatch):
    cfg = tiny_config(epochs=100, lr=0.05, evals_per_epoch=2, patience=1000, max_seconds=35)
    fmap, train, _ = _toy_splits()
    trainer = Trainer(cfg.train, Runtime.of(cfg.train, "cpu"))
    evaluate = trainer.evaluate

    def slow_evaluate(model, split):  # each interval up to an evaluation takes 10 s
        clock[0] += 10.0
        return evaluate(model, split)

    monkeypatch.setattr(trainer, "evaluate", slow_evaluate)
    torch.manual_seed(0)
    result = trainer.fit(build_model(cfg.model, fmap), train, eval_split=train)
    # at 30 s the next evaluation would come at 40 s, past 35: stop there, best weights kept
    assert [e["epoch"] for r in result.history for e in r.evals] == [0.5, 1.0, 1.5]
    assert result.stopped == "budget" and result.seconds == 30.0


def test_a_stage_without_evaluations_checks_its_budget_each_epoch(clock):
    cfg = tiny_config(epochs=10, lr=0.05, max_seconds=35)
    fmap, train, _ = _toy_splits()
    torch.manual_seed(0)
    result = Trainer(cfg.train, Runtime.of(cfg.train, "cpu")).fit(
        build_model(cfg.model, fmap), train, on_epoch_end=lambda r: clock.__setitem__(0, clock[0] + 10.0))
    assert len(result.history) == 4 and result.stopped == "budget"


def test_budget_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        budget.Budget(0)


def test_a_budget_spent_before_the_first_measure_stops_there(clock, tmp_path):
    # the first steps are slow (compilation, a loaded machine): 5 s each, 12 s allowed
    cfg = PretrainConfig(lr=1e-2, batch_size=2, epochs=5, progress=False, amp="off", max_seconds=12)
    steps = []

    def on_step(epoch, step, loss):
        clock[0] += 5.0
        steps.append(step)

    model, _, _ = _tiny_pair()
    history = Pretrainer(cfg, Runtime.of(cfg, "cpu"), tmp_path).fit(model, _pretrain_split(), on_step=on_step)
    assert len(steps) == 3 and history[-1]["stopped_by_budget"]  # 15 s: the first step past 12
