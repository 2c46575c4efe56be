"""Hyperparameter search on validation (``flipctr tune``), with Optuna.

A search space file names settings (any ``--set`` key) and the values to try:

    train.lr: [1.0e-5, 5.0e-5, 1.0e-4, 5.0e-4, 1.0e-3, 5.0e-3]   # a list: categorical (a grid)
    train.batch_size: [256, 1024, 4096]
    model.embedding_dim: {low: 8, high: 64, log: true}        # integer bounds: an integer range
    model.dropout: {low: 0.0, high: 0.5}                        # a float range (``step`` optional)

Each trial is the clean protocol's selection stage (train on train, early stopping on
validation AUC) in its own run folder, ``RUN_DIR/trials/trial-NNNN``; its validation AUC goes
to the pruner after every evaluation. The best trial (highest validation AUC) is then run
through the whole protocol into ``RUN_DIR/best``: selected again, refitted on train+valid, and
evaluated on test once. Test plays no part in any choice.

The study lives in ``RUN_DIR/study.db`` (SQLite) or a database given by ``--storage URL``: the
same command resumes it after a kill (a trial the kill interrupted is failed and run again with
its settings), ``--workers K`` runs K processes on it, and machines that share one database URL
share the study.

``method="flip"`` searches the finetuning of the joint FLIP model (``flipctr run``'s ``flip``
variant, a ``--profile``'s settings) on one pretraining, made once in ``RUN_DIR/pretrain`` and
shared by every trial: its space holds finetuning settings only (``train.*``, ``text_finetune.*``).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import math
import multiprocessing as mp
import os
import re
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from ..config import Config, apply_dict, load_config
from ..profiles import profile_config
from ..runtime.folder import RunFolder
from ..training.tracking import setup_logging
from ..utils import atomic_path, write_json, write_text
from .flip import finetune_flip, pretrain_once
from .protocol import train_run

log = logging.getLogger("flipctr")
STUDY = "flipctr-tune"
SEARCHES = ("id", "flip")  # what a search tunes: an ID model alone, or FLIP's finetuning on one pretraining
FLIP_SECTIONS = ("train", "text_finetune")  # what a search over one shared pretraining may change
PRUNERS = ("median", "halving", "none")


class TuneError(ValueError):
    """A search that cannot run (its space, its study, its folder): said before any trial runs."""


@dataclass(frozen=True)
class Param:
    """One searched setting: ``choices`` (categorical), or a ``low``..``high`` range of ints or
    floats, on a log scale or in steps of ``step``."""

    key: str  # section.name, as --set takes it
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def to_dict(self) -> Any:
        if self.choices is not None:
            return list(self.choices)
        return {k: v for k, v in (("low", self.low), ("high", self.high), ("log", self.log),
                                  ("step", self.step), ("int", self.integer)) if v not in (None, False)}


def load_space(path: str | Path, base: Config) -> list[Param]:
    """The search space of a YAML file, checked against ``base``: every key a setting, every value
    one it accepts. Raises :class:`TuneError` naming the file and key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise TuneError(f"{path}: cannot read the search space ({err})") from err
    if not isinstance(raw, dict) or not raw:
        raise TuneError(f"{path}: the search space is empty; give settings and their values, "
                         "e.g. 'train.lr: [1.0e-4, 1.0e-3]'")
    space = []
    for key, spec in raw.items():
        where = f"{path}: {key}"
        section, _, name = str(key).partition(".")
        target = getattr(base, section, None)
        if not name or not dataclasses.is_dataclass(target) or name not in {f.name for f in dataclasses.fields(target)}:
            raise TuneError(f"{where}: unknown setting (expected section.key, e.g. train.lr; sections: "
                             f"{[f.name for f in dataclasses.fields(base)]})")
        if isinstance(spec, list):
            if not spec:
                raise TuneError(f"{where}: an empty list of values")
            param = Param(key, choices=tuple(spec))
        elif isinstance(spec, dict):
            unknown = set(spec) - {"low", "high", "log", "step", "int"}
            if unknown or not {"low", "high"} <= set(spec):
                raise TuneError(f"{where}: a range is {{low, high[, log][, step][, int]}}, not {spec}")
            low, high = spec["low"], spec["high"]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low >= high:
                raise TuneError(f"{where}: low must be a number below high ({low!r}, {high!r})")
            integer = bool(spec.get("int", isinstance(low, int) and isinstance(high, int)))
            if spec.get("log") and (low <= 0 or spec.get("step")):
                raise TuneError(f"{where}: a log range needs low > 0 and no step")
            param = Param(key, low=low, high=high, log=bool(spec.get("log", False)), step=spec.get("step"),
                          integer=integer)
        else:
            raise TuneError(f"{where}: give a list of values or a range {{low, high}}, not {spec!r}")
        kind = next(f.type for f in dataclasses.fields(target) if f.name == name)
        for value in param.choices or (param.low, param.high):
            _check_value(where, str(kind), value)
        space.append(param)
    return space


def _check_value(where: str, kind: str, value: Any) -> None:
    """``value`` fits a setting annotated ``kind`` (e.g. "float | None", "list[int]")."""
    names = {part.strip() for part in re.sub(r"\[.*?\]", "", kind).split("|")}
    if value is None and "None" in names:
        return
    accepted = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,), "list": (list,)}
    allowed = tuple(t for name in names for t in accepted.get(name, ()))
    if not isinstance(value, allowed) or (isinstance(value, bool) and "bool" not in names):
        raise TuneError(f"{where}: {value!r} is not a valid value of this setting ({kind})")


@dataclass
class Search:
    """A search as the command gives it; stored with the study, so that a resume that asks for
    another search is refused."""

    run_dir: str
    space_file: str
    config_file: str | None
    overrides: list[str]
    method: str = "id"
    profile: str | None = None  # a flipctr run profile under the config file and overrides (FLIP)
    sampler: str = "tpe"
    pruner: str = "median"
    trials: int = 20
    seed: int = 0
    storage: str | None = None

    @property
    def folder(self) -> Path:
        return Path(self.run_dir)

    def base_config(self) -> Config:
        if self.profile is None:
            return load_config(self.config_file, self.overrides)

        return profile_config(self.profile, [*self.fixed(), *self.overrides],
                              load_config(self.config_file) if self.config_file else None)

    def fixed(self) -> list[str]:
        """Settings the method fixes under the user's: FLIP's trials finetune the joint model from
        the shared pretraining (not from finetuned FLIP_ID and FLIP_PLM, as the cpu profile does)."""
        return ["text_finetune.joint_init=pretrained"] if self.method == "flip" else []

    def rerun(self, params: dict[str, Any], run_dir: str) -> str:
        """The command that trains ``params`` again from ``best.yaml`` (the whole protocol)."""
        if self.method == "flip":  # a profile applies over --config: the searched settings go after it
            sets = [*self.fixed(), *(f"{k}={v}" for k, v in params.items())]
            return (f"flipctr run --profile {self.profile} --config {self.folder / 'best.yaml'} --run-dir {run_dir} "
                    + " ".join(f"--set {s}" for s in sets))
        return f"flipctr train --config {self.folder / 'best.yaml'} --run-dir {run_dir}"

    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.folder / 'study.db').resolve()}"

    def identity(self, space: list[Param]) -> dict:
        return {"space": {p.key: p.to_dict() for p in space}, "config": self.base_config().to_dict(),
                "method": self.method, "sampler": self.sampler, "pruner": self.pruner, "seed": self.seed}


def _optuna():
    try:
        import optuna
    except ImportError as err:
        raise TuneError("flipctr tune needs Optuna: pip install 'flipctr[tune]'") from err
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def _storage(search: Search):
    _optuna()
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    # a worker that dies stops beating; after the grace period its trial is failed and run again
    return RDBStorage(search.storage_url(), engine_kwargs={"connect_args": {"timeout": 60}}
                      if search.storage_url().startswith("sqlite") else None,
                      heartbeat_interval=30, grace_period=120,
                      heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))


def _sampler(search: Search, space: list[Param], stream: int = 0):
    """The search's sampler, seeded by ``--seed`` and ``stream``: each process (a resume, a worker)
    draws its own numbers, or a seeded sampler started again would propose the trials it proposed
    before."""
    optuna = _optuna()
    seed = (search.seed + 1_000_003 * stream) % 2**32
    if search.sampler == "grid":
        ranges = [p for p in space if p.choices is None]
        if ranges:
            raise TuneError(f"{search.space_file}: the grid sampler needs lists of values; "
                             f"{[p.key for p in ranges]} are ranges (use --sampler tpe)")
        return optuna.samplers.GridSampler({p.key: list(p.choices) for p in space}, seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _pruner(name: str):
    optuna = _optuna()
    if name == "median":  # below the median of earlier trials at the same evaluation: from the 2nd on, after 2 trials
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.NopPruner()


def grid_size(space: list[Param]) -> int:
    return math.prod(len(p.choices) for p in space if p.choices is not None)


def open_study(search: Search, space: list[Param], create: bool = True, worker: int = 0):
    """The search's study (made on first use); a study made by another search is refused. Its
    sampler's stream: the trials already there and ``worker``."""
    optuna = _optuna()
    identity = json.loads(json.dumps(search.identity(space)))
    storage = _storage(search)
    if not create and STUDY not in optuna.get_all_study_names(storage):
        raise TuneError(f"{search.storage_url()}: no study to resume")
    study = optuna.create_study(study_name=STUDY, storage=storage, direction="maximize",
                                sampler=_sampler(search, space), pruner=_pruner(search.pruner),
                                load_if_exists=True) if create else \
        optuna.load_study(study_name=STUDY, storage=storage, sampler=_sampler(search, space),
                          pruner=_pruner(search.pruner))
    stored = study.user_attrs.get("search")
    if stored is None:
        study.set_user_attr("search", identity)
    elif stored != identity:
        changed = sorted(k for k in identity if identity[k] != stored.get(k))
        raise TuneError(f"{search.storage_url()}: holds a study of another search (differs in {changed}); "
                         "use another --run-dir (or --storage) for a new search")
    study.sampler = _sampler(search, space, stream=len(study.trials) * 1024 + worker)
    return study


def _stop_at(trials: int):
    """Stops a process's trials once the study holds ``trials`` finished ones (see :func:`finished`)."""
    optuna = _optuna()
    return optuna.study.MaxTrialsCallback(trials, states=(optuna.trial.TrialState.COMPLETE,
                                                          optuna.trial.TrialState.PRUNED))


def finished(study) -> int:
    """Trials that count toward ``--trials``: completed or pruned."""
    from optuna.trial import TrialState

    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.get_trials(deepcopy=False))


def trial_config(base: Config, params: dict[str, Any]) -> Config:
    cfg = Config.from_dict(base.to_dict())
    for key, value in params.items():
        section, name = key.split(".", 1)
        apply_dict(cfg, {section: {name: value}}, "search space")
    return cfg


class Objective:
    """One trial: its settings from the sampler, the selection stage in its own run folder, the
    validation AUC after each evaluation to the pruner."""

    def __init__(self, search: Search, space: list[Param], data_root: Path | None = None):
        self.search, self.space, self.data_root = search, space, data_root
        self.base = search.base_config()

    def __call__(self, trial) -> float:
        optuna = _optuna()
        params = {p.key: p.suggest(trial) for p in self.space}
        cfg = trial_config(self.base, params)
        folder = self.search.folder / "trials" / f"trial-{trial.number:04d}"
        trial.set_user_attr("run_dir", str(folder))
        evaluations = 0

        def report(record) -> None:
            nonlocal evaluations
            for evaluation in record.evals:
                evaluations += 1
                trial.report(evaluation["auc"], evaluations)
            trial.set_user_attr("epochs_run", record.epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"valid AUC {record.evals[-1]['auc']:.4f} after epoch {record.epoch}")

        try:
            metrics = train(self.search, cfg, folder, self.data_root, on_epoch_end=report, select_only=True)
        except optuna.TrialPruned:
            RunFolder(folder).checkpoint("train").unlink(missing_ok=True)  # never resumed: a new trial starts anew
            log.info("trial %d pruned after %d evaluations", trial.number, evaluations)
            raise
        except KeyboardInterrupt:  # Ctrl-C or a kill (SIGTERM): Optuna fails the trial; a resume runs it again
            trial.set_user_attr("interrupted", True)
            raise
        trial.set_user_attr("best_epoch", metrics["best_epoch"])
        trial.set_user_attr("epochs_run", metrics["epochs"])
        trial.set_user_attr("valid_logloss", metrics["valid"]["logloss"])
        return metrics["valid"]["auc"]


def train(search: Search, cfg: Config, folder: Path, data_root: Path | None, **options) -> dict:
    """A trial's (or the best's) training run: an ID model's, or FLIP's finetuning on the search's
    pretraining."""
    if search.method == "flip":
        return finetune_flip(cfg, search.folder / "pretrain", folder, data_root, **options)
    return train_run(cfg, folder, data_root, **options)


def _worker(search: Search, space: list[Param], data_root: Path | None, threads: int | None, worker: int) -> None:
    """A process of ``--workers``: trials of the shared study until the search is done."""
    _optuna()  # Optuna missing: one clear error

    if threads:
        torch.set_num_threads(threads)
    study = open_study(search, space, create=False, worker=worker + 1)
    if finished(study) >= search.trials:
        return
    study.optimize(Objective(search, space, data_root), catch=(), callbacks=[_stop_at(search.trials)])


class RunDirLock:
    """One ``flipctr tune`` at a time on a run folder (its workers are its own children): while it
    holds the lock, trials left running in the folder's study were cut off by a kill."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.file = open(folder / "tune.lock", "w")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise TuneError(f"{folder}: another flipctr tune is running on this folder") from err

    def release(self) -> None:
        self.file.close()


def recover_interrupted(study, search: Search) -> list[int]:
    """Queue again, with their settings, the trials a kill cut off (the study is this folder's own,
    and no other tune holds it): those it left running (failed here) and those an interrupt
    (Ctrl-C, SIGTERM) failed, each once; returns their numbers."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials}
    cut = [t for t in trials if t.number not in retried and (
        t.state == TrialState.RUNNING or (t.state == TrialState.FAIL and t.user_attrs.get("interrupted")))]
    for trial in cut:
        if trial.state == TrialState.RUNNING:
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        RetryHeartbeatStaleTrialCallback(max_retry=1)(study, study._storage.get_trial(trial._trial_id))
        log.info("trial %d was cut off by a kill: failed, and queued again with its settings", trial.number)
    return [t.number for t in cut]


def run_search(search: Search, workers: int = 1, data_root: Path | None = None, progress: bool = True,
               resume: bool = False) -> dict:
    """Run a search, or go on with its study where one exists (``resume``: only then), write its
    outputs and refit the best trial; returns the summary that ``tune.json`` holds."""
    _optuna()  # Optuna missing: one clear error, before any work


    base = search.base_config()
    space = load_space(search.space_file, base)
    if base.train.protocol != "clean":
        raise TuneError("tune selects on validation: train.protocol must be clean")
    if search.method not in SEARCHES:
        raise TuneError(f"--method must be one of {SEARCHES}, not {search.method!r}")
    if search.method == "flip":
        shared = [p.key for p in space if p.key.split(".")[0] not in FLIP_SECTIONS]
        if shared:
            raise TuneError(f"{search.space_file}: a FLIP search shares one pretraining and searches finetuning "
                            f"settings ({', '.join(s + '.*' for s in FLIP_SECTIONS)}), not {shared}")
        if base.text_finetune.joint_init != "pretrained":
            raise TuneError("a FLIP search finetunes from its pretraining: text_finetune.joint_init=pretrained")
    if search.sampler == "grid":
        search = dataclasses.replace(search, trials=min(search.trials, grid_size(space)))
    folder = search.folder
    lock = RunDirLock(folder)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a kill stops the trial as Ctrl-C does
    try:
        setup_logging(folder / "train.log")
        study = open_study(search, space, create=not resume)
        if search.storage is None:
            recover_interrupted(study, search)
        write_text(folder / "search.yaml", yaml.safe_dump(dataclasses.asdict(search), sort_keys=False))
        if search.method == "flip":
            pretrain_once(base, folder / "pretrain", data_root)
        log.info("search: %d trials (%s sampler, %s pruner), %d done; space %s", search.trials, search.sampler,
                 search.pruner, finished(study), {p.key: p.to_dict() for p in space})
        bar = tqdm(total=search.trials, initial=min(finished(study), search.trials), desc="trials", unit="trial",
                   disable=not progress)
        if workers <= 1:
            def advance(study, trial) -> None:
                bar.n = min(finished(study), search.trials)
                bar.refresh()

            if finished(study) < search.trials:
                study.optimize(Objective(search, space, data_root), catch=(),
                               callbacks=[_stop_at(search.trials), advance])
        else:
            _run_workers(search, space, workers, data_root, bar, study)
        bar.close()
        setup_logging(folder / "train.log")  # the trials logged into their own folders
        return finish(study, search, space, data_root)
    finally:
        signal.signal(signal.SIGTERM, previous)
        lock.release()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _run_workers(search: Search, space: list[Param], workers: int, data_root: Path | None, bar, study) -> None:
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = mp.get_context("spawn")
    procs = [context.Process(target=_worker, args=(search, space, data_root, threads, i)) for i in range(workers)]
    for proc in procs:
        proc.start()
    while any(p.is_alive() for p in procs):
        bar.n = min(finished(study), search.trials)
        bar.refresh()
        time.sleep(2)
    failed = [p.exitcode for p in procs if p.exitcode]
    if failed:
        raise RuntimeError(f"{len(failed)} of {workers} tune workers failed (exit codes {failed}); see their trials' "
                           "train.log")


def finish(study, search: Search, space: list[Param], data_root: Path | None) -> dict:
    """trials.csv, best.yaml, the PNGs, the best trial refitted and tested once (``RUN_DIR/best``)
    and ``tune.json``."""
    from optuna.trial import TrialState

    folder = search.folder
    frame = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "duration"))
    with atomic_path(folder / "trials.csv") as tmp:
        frame.to_csv(tmp, index=False)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise RuntimeError(f"{folder}: no trial completed (see trials.csv)")
    best = study.best_trial
    cfg = trial_config(search.base_config(), best.params)
    write_text(folder / "best.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    _plots(study, folder)
    log.info("best trial %d: valid AUC %.4f with %s; refit on train+valid, tested once", best.number, best.value,
             best.params)
    metrics = train(search, cfg, folder / "best", data_root, resume=True)
    pruned = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    full = [t.user_attrs.get("epochs_run", 0) for t in complete]
    summary = {
        "trials": {"complete": len(complete), "pruned": len(pruned),
                   "failed": len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))},
        "best_trial": best.number, "best_params": best.params, "best_valid_auc": best.value,
        "best_run": str(folder / "best"), "rerun": search.rerun(best.params, "RUN_DIR"),
        # the refit run selects again: on the same machine it should find the trial's validation AUC
        "best_run_valid_auc": metrics["valid"]["auc"], "test": metrics["test"],
        "epochs": {"complete_trials": sum(full), "pruned_trials": sum(t.user_attrs.get("epochs_run", 0) for t in pruned),
                   "mean_per_complete_trial": round(sum(full) / len(full), 2)},
        "search": dataclasses.asdict(search),
    }
    if pruned:  # what pruning saved, had each pruned trial run as long as the completed ones on average
        summary["epochs"]["saved_by_pruning_estimate"] = round(
            sum(max(0.0, summary["epochs"]["mean_per_complete_trial"] - t.user_attrs.get("epochs_run", 0))
                for t in pruned), 1)
    write_json(folder / "tune.json", summary)
    return summary


def _plots(study, folder: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization.matplotlib import (
            plot_optimization_history,
            plot_param_importances,
        )
    except ImportError:
        log.info("matplotlib not installed: no search plots")
        return
    for name, plot in (("history", plot_optimization_history), ("importances", plot_param_importances)):
        try:
            axes = plot(study)
        except (ValueError, RuntimeError) as err:  # e.g. importances of one parameter with one value
            log.info("no %s plot: %s", name, err)
            continue
        figure = axes.figure
        figure.tight_layout()
        with atomic_path(folder / f"{name}.png") as tmp:
            figure.savefig(tmp, format="png", dpi=100)
        plt.close(figure)
