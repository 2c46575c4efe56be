"""The paper's analyses of a ``flipctr run`` folder, as figures (``flipctr figure ...``).

- ``alignment`` (Fig. 5): for each pair of fields (f, g), the mean dot product of the
  normalised ICL representations of a sample with field f masked in its text and the same
  sample with field g masked in its table. A fine-grained alignment peaks on the diagonal.
- ``embeddings`` (Fig. 6): the feature embedding table of the ID backbone projected on its top
  two right singular vectors (uncentred SVD), coloured by field: from scratch, after
  pretraining and after finetuning (FLIP_ID). Collapse into a narrow cone shows as one
  dominant singular value.
- ``sweep`` (Figs. 3-4): ``flipctr run`` over the text and table mask ratios and the ICL
  temperature, each varied with the others at their configured values, then plotted.

Each writes a PNG and a JSON of the numbers plotted beside it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import Config
from ..data.cache import prepare
from ..data.encoder import MASK_ID, FeatureMap
from ..data.lm_files import load_tokenizer
from ..data.masking import field_mask, mask_tabular, span_token_mask
from ..runtime.checkpoints import load_weights
from ..runtime.device import resolve_device
from ..runtime.folder import RunFolder
from ..utils import atomic_path, write_json
from .flip import ENCODING, pretraining_model, run_flip
from .inputs import ModelInputs
from .report import variant_name


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@torch.no_grad()
def field_alignment(run_dir: str | Path, rows: int = 1000, batch_size: int = 128, seed: int = 0,
                    data_root: Path | None = None) -> dict:
    """Fig. 5 on ``rows`` seeded validation rows: ``{"fields", "similarity" (F x F), "rows"}``,
    similarity[f][g] = mean_i <z_text(x_i with field f masked), z_tab(x_i with field g masked)>,
    both ICL projections normalised. Needs the run's pretraining with ICL on."""
    folder = RunFolder(run_dir)
    cfg = folder.read_config()
    weights = folder.pretrain.pretrained
    if not weights.exists():
        raise FileNotFoundError(f"{run_dir}: no {weights.relative_to(folder.path)} (the run did not pretrain)")
    if not cfg.flip.icl:
        raise ValueError(f"{run_dir}: pretrained without ICL; the alignment figure compares its projections")
    device = resolve_device(cfg.train.device)
    data = prepare(cfg.data, data_root, verbose=False)
    encoding = data.encoding(ENCODING)
    model = pretraining_model(cfg, encoding)
    model.load_state_dict(load_weights(weights))
    model.to(device).eval()
    split = ModelInputs(data, cfg, device, text=True).split("valid", ENCODING, spans=True, sample=rows, seed=seed)
    text_mask = load_tokenizer(cfg.model.plm).mask_token_id
    n_fields = model.backbone.num_fields
    fields = torch.arange(n_fields, device=device)
    total = torch.zeros(n_fields, n_fields, dtype=torch.float64, device=device)
    for start in range(0, len(split), batch_size):
        batch = split.batch(torch.arange(start, min(start + batch_size, len(split)), device=device),
                            ("ids", "input_ids", "value_spans"))
        b, width = len(batch["ids"]), batch["input_ids"].shape[1]
        z_text, z_tab = [], []
        for f in fields:  # field f masked, in the text and in the table
            chosen = field_mask(f.expand(b, 1), n_fields)
            masked_text = batch["input_ids"].masked_fill(span_token_mask(batch["value_spans"], chosen, width),
                                                         text_mask)
            cls = model.language_model(masked_text, batch["attention_mask"]).cls
            z_text.append(F.normalize(model.icl_head.text_proj(cls.float()), dim=-1))
            v = model.backbone.encode(mask_tabular(batch["ids"], chosen, MASK_ID))
            z_tab.append(F.normalize(model.icl_head.tab_proj(v), dim=-1))
        total += torch.einsum("fbd,gbd->fg", torch.stack(z_text), torch.stack(z_tab)).double()
    similarity = (total / len(split)).cpu().numpy()
    return {"run_dir": str(run_dir), "fields": encoding.feature_map.field_names, "rows": len(split),
            "similarity": similarity.round(5).tolist(),
            "diagonal_is_row_max": int((similarity.argmax(1) == np.arange(n_fields)).sum())}


def plot_alignment(result: dict, path: Path) -> None:
    plt = _pyplot()
    sim, names = np.array(result["similarity"]), result["fields"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(names), 0.6 + 0.6 * len(names)))
    image = ax.imshow(sim, cmap="viridis")
    ax.set_xticks(range(len(names)), [f"Tab-{n}" for n in names], rotation=60, ha="right")
    ax.set_yticks(range(len(names)), [f"Text-{n}" for n in names])
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_title(f"masked-field similarity ({result['rows']} rows)")
    _save_figure(fig, path)


def embedding_sources(run: RunFolder) -> list[tuple[str, Path, str]]:
    """The ID backbones of a FLIP run folder: (variant, weights file, prefix of the embedding
    table's key)."""
    return [("scratch", run.variant("scratch").model, ""), ("pretrained", run.pretrain.pretrained, "backbone."),
            ("flip_id", run.variant("flip_id").model, "")]


def _feature_map(run: RunFolder) -> FeatureMap:
    for folder in (run.pretrain, run.variant("scratch"), run.variant("flip_id")):
        if folder.feature_map.exists():
            return FeatureMap.load(folder.feature_map)
    raise FileNotFoundError(f"{run.path}: no feature_map.json in pretrain/, scratch/ or flip_id/")


def embedding_projection(run_dirs: list[str | Path], max_points: int = 20000, seed: int = 0) -> dict:
    """Fig. 6: per backbone found in ``run_dirs`` (from scratch, pretrained, FLIP_ID), the
    feature embeddings (mask id left out) projected on the top two right singular vectors,
    at most ``max_points`` rows (a seeded sample), and the share of each of the top singular values."""
    panels = []
    for run in map(RunFolder, run_dirs):
        fmap = _feature_map(run)
        report = run.read_results()  # how the run names its models (CTRL's ID model is not FLIP_ID)
        field_of = np.full(fmap.num_features, -1)
        for index, info in enumerate(fmap.fields):
            field_of[info.offset:info.offset + info.size] = index
        for variant, file, prefix in embedding_sources(run):
            if not file.exists():
                continue
            table = load_weights(file)[f"{prefix}embedding.weight"].float()
            keep = np.flatnonzero(field_of >= 0)
            _, s, vh = torch.linalg.svd(table[keep], full_matrices=False)
            points = (table[keep] @ vh[:2].T).numpy()
            sample = np.sort(np.random.default_rng(seed).permutation(len(keep))[:max_points])
            name = variant if variant == "pretrained" else variant_name(variant, report)
            panels.append({"run": run.path.name, "model": name, "fields": fmap.field_names,
                           "points": points[sample].round(5).tolist(), "field": field_of[keep][sample].tolist(),
                           "singular_value_share": (s / s.sum())[:8].numpy().round(4).tolist()})
    if not panels:
        raise FileNotFoundError(f"no backbone weights in {[str(p) for p in run_dirs]} "
                                f"(looked for {[str(f) for r in map(RunFolder, run_dirs) for _, f, _ in embedding_sources(r)]})")
    return {"panels": panels}


def plot_embeddings(result: dict, path: Path) -> None:
    plt = _pyplot()
    panels = result["panels"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    cmap = plt.get_cmap("tab10" if len(panels[0]["fields"]) <= 10 else "tab20")
    for ax, panel in zip(axes[0], panels):
        points, field = np.array(panel["points"]), np.array(panel["field"])
        for index, name in enumerate(panel["fields"]):
            at = field == index
            ax.scatter(points[at, 0], points[at, 1], s=2, color=cmap(index % cmap.N), label=name, rasterized=True)
        ax.set_title(f"{panel['run']}: {panel['model']}\nσ1 share {panel['singular_value_share'][0]:.2f}",
                     fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][-1].legend(markerscale=4, fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    _save_figure(fig, path)


# the settings of Figs. 3-4 and the values the paper tried
SWEEP_SETTINGS = {"text_mask_ratio": [0.15, 0.3, 0.6], "tab_mask_ratio": [0.15, 0.3, 0.6],
                  "temperature": [0.05, 0.1, 0.3, 0.5, 0.7, 1.0]}


def sweep(cfg: Config, runs: Path, grid: dict[str, list[float]], variants: tuple[str, ...] = ("flip_id",),
          profile: str | None = None) -> dict:
    """Figs. 3-4: one ``flipctr run`` (``variants``) per value of each setting in ``grid`` (keys of
    :data:`SWEEP_SETTINGS`), the others at ``cfg``'s values. Points are folders of ``runs`` named
    by all three settings, so a point shared by two curves runs once, and a finished one is read
    back (``--resume``). The reported model is the last of ``variants``."""
    unknown = set(grid) - set(SWEEP_SETTINGS)
    if unknown:
        raise ValueError(f"unknown sweep settings {sorted(unknown)}; choose from {sorted(SWEEP_SETTINGS)}")
    base = {name: getattr(cfg.flip, name) for name in SWEEP_SETTINGS}
    reported = variants[-1]
    points = []
    for name, values in grid.items():
        for value in values:
            setting = {**base, name: float(value)}
            folder = runs / "-".join(f"{k}={v:g}" for k, v in setting.items())
            point_cfg = dataclasses.replace(cfg, flip=dataclasses.replace(cfg.flip, **setting))
            report = run_flip(point_cfg, folder, variants, resume=True, profile=profile)
            metrics = report["results"][reported]
            points.append({"setting": name, "value": float(value), "run_dir": str(folder),
                           "valid_auc": metrics["valid"]["auc"] if metrics.get("valid") else None,
                           "test_auc": metrics["test"]["auc"], "wall_seconds": report["wall_seconds"]})
    return {"model": reported, "base": base, "points": points}


def plot_sweep(result: dict, path: Path) -> None:
    plt = _pyplot()
    settings = list(dict.fromkeys(p["setting"] for p in result["points"]))
    fig, axes = plt.subplots(1, len(settings), figsize=(4 * len(settings), 3.2), squeeze=False)
    for ax, name in zip(axes[0], settings):
        points = sorted((p for p in result["points"] if p["setting"] == name), key=lambda p: p["value"])
        xs = [p["value"] for p in points]
        ax.plot(xs, [p["test_auc"] for p in points], "o-", label="test AUC")
        if all(p["valid_auc"] is not None for p in points):
            ax.plot(xs, [p["valid_auc"] for p in points], "s--", label="valid AUC")
        ax.set_xlabel(name)
        ax.set_title(result["model"], fontsize=9)
        ax.legend(fontsize=7)
    _save_figure(fig, path)


def write_figure(result: dict, plot, out: Path) -> None:
    """``out`` (PNG) and the numbers behind it, ``out`` with ``.json``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(result, out)
    write_json(out.with_suffix(".json"), result)


__all__ = ["embedding_projection", "field_alignment", "plot_alignment", "plot_embeddings", "plot_sweep", "sweep",
           "write_figure", "SWEEP_SETTINGS"]
