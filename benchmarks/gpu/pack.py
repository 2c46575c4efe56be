"""Build the folder a GPU machine without internet needs to run flipctr's `gpu` profile.

    python benchmarks/gpu/pack.py OUT_DIR [--dataset ml-1m] [--plm minilm-l6] [--limit-mib 60]

OUT_DIR gets ``raw-<dataset>.tar.xz`` (the fetched raw folder, SOURCE.json included) and
``plm/`` (the encoder's config and tokenizer files, its weights as bf16 safetensors: half
the size; flipctr loads them back into fp32 master weights). Raw data must have been fetched
(`flipctr data get`) and the encoder too (`flipctr lm get`). The folder is written under a
temporary name and renamed when complete; a pack over ``--limit-mib`` is an error.
Run it there with ``bash benchmarks/gpu/oneshot.sh OUT_DIR RESULTS_DIR``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tarfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from flipctr.data.sources import raw_dir
from flipctr.data.lm_files import resolve_language_model
from flipctr.utils import atomic_dir

PLM_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
             "merges.txt", "vocab.json")


def build_pack(out: Path, dataset: str = "ml-1m", plm: str = "minilm-l6", limit_mib: float = 60) -> Path:
    raw = raw_dir(dataset)
    if not (raw / "SOURCE.json").exists():
        raise SystemExit(f"{dataset}: raw files not found in {raw}; run `flipctr data get {dataset}` first")
    encoder = Path(resolve_language_model(plm))
    if not (encoder / "model.safetensors").exists():
        raise SystemExit(f"{plm}: no model.safetensors in {encoder}")
    with atomic_dir(out) as tmp:
        with tarfile.open(tmp / f"raw-{dataset}.tar.xz", "w:xz") as tar:
            tar.add(raw, arcname=dataset)
        (tmp / "plm").mkdir()
        for name in PLM_FILES:
            if (encoder / name).exists():
                shutil.copy2(encoder / name, tmp / "plm" / name)
        weights = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous()
                   for k, v in load_file(str(encoder / "model.safetensors")).items()}
        save_file(weights, str(tmp / "plm" / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "PACK.json").write_text(json.dumps({"dataset": dataset, "plm": plm, "plm_weights": "bfloat16"},
                                                  indent=2) + "\n")
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) / 2**20
        if size > limit_mib:
            raise SystemExit(f"the pack is {size:.1f} MiB, over the {limit_mib} MiB limit")
    print(f"{out}: {size:.1f} MiB")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--dataset", default="ml-1m")
    parser.add_argument("--plm", default="minilm-l6")
    parser.add_argument("--limit-mib", type=float, default=60)
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    build_pack(args.out, args.dataset, args.plm, args.limit_mib)


if __name__ == "__main__":
    main()
