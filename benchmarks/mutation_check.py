"""Deliberate faults of the method, each applied to a scratch copy of the code: the tests must
fail on every one, or they do not pin what FLIP is.

    python benchmarks/mutation_check.py [--only NAME ...] [--name mutations]

Copies ``src/`` and ``tests/`` to a temporary folder, runs the selected tests there once as
they are (they must pass), then once per fault with that fault alone applied (each fault is
an exact text replacement that must match once), and writes
``benchmarks/results/NAME.{json,md}``: per fault, whether the tests caught it and which failed.
Not in CI (about 15 s per fault on 2 cores); run it before committing a change to the method.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# the tests that pin the method: the wiring and the pieces of FLIP, without the end-to-end runs
TESTS = ("tests/test_wiring.py", "tests/test_flip.py", "-k",
         "not flip_run and not ctrl_is and not ptab_is and not text_vectors and not frozen")


@dataclass(frozen=True)
class Fault:
    name: str
    what: str  # the fault in words
    file: str  # under src/flipctr
    old: str
    new: str


FLIP, MASKING, TRAINER = "models/flip.py", "data/masking.py", "training/trainer.py"
FAULTS = [
    # which state feeds which head (Eq. 5-11)
    Fault("mlm_reads_clean_text", "MLM head reads the clean text w instead of ŵ", FLIP,
          "w_hat = both.hidden_states[len(ids):]", "w_hat = both.hidden_states[:len(ids)]"),
    Fault("mlm_joins_masked_table", "MLM head joins the masked table v̂ instead of v", FLIP,
          'losses["mlm"] = self._mlm_loss(w_hat, v,',
          'losses["mlm"] = self._mlm_loss(w_hat, self.backbone.encode(masked.masked_ids),'),
    Fault("mlm_targets_masked_text", "MLM targets are the masked text's ids, not the original tokens", FLIP,
          "self._mlm_loss(w_hat, v, input_ids,", "self._mlm_loss(w_hat, v, masked.masked_input_ids,"),
    Fault("mtm_sees_clean_table", "MTM reads the unmasked table v instead of v̂", FLIP,
          "v_hat = self.backbone.encode(masked.masked_ids)", "v_hat = self.backbone.encode(ids)"),
    Fault("mtm_attends_masked_text", "MTM's cross-attention reads ŵ instead of the clean text w", FLIP,
          "u = self.mtm_head.attend(v_hat, w.hidden_states, attention_mask)",
          "u = self.mtm_head.attend(v_hat, w_hat, attention_mask)"),
    Fault("mtm_targets_masked_ids", "MTM is scored against the masked ids, not the original ones", FLIP,
          "self.mtm_head(v_hat, u, masked.tab_fields, ids,", "self.mtm_head(v_hat, u, masked.tab_fields, masked.masked_ids,"),
    Fault("icl_masked_table", "ICL pairs [CLS] with the masked table v̂", FLIP,
          'losses["icl"] = self.icl_head(w.cls, v)',
          'losses["icl"] = self.icl_head(w.cls, self.backbone.encode(masked.masked_ids))'),
    Fault("icl_masked_text", "ICL takes [CLS] of the masked text", FLIP,
          "w = LMOutput(both.hidden_states[:len(ids)], both.cls[:len(ids)])",
          "w = LMOutput(both.hidden_states[:len(ids)], both.cls[len(ids):])"),
    # normalisations and scales (Eq. 6, 7, 9, 11, 12)
    Fault("mlm_mean_over_all_tokens", "MLM averages over the batch's tokens, not per sample then over B", FLIP,
          "return (per_sample / positions.sum(1).clamp_min(1)).sum() / len(input_ids)",
          "return per_sample.sum() / positions.sum().clamp_min(1)"),
    Fault("mtm_sum_over_fields", "MTM sums over a sample's masked fields instead of averaging", FLIP,
          "self.log_q[noise], k).mean(1)", "self.log_q[noise], k).sum(1)"),
    Fault("attention_unscaled", "cross-attention without the 1/√Dt scale", FLIP,
          'w) / math.sqrt(self.text_dim)', 'w)'),
    Fault("attention_sees_padding", "cross-attention over padded positions", FLIP,
          "scores = scores.masked_fill(attention_mask == 0, torch.finfo(scores.dtype).min)", "scores = scores"),
    Fault("mtm_sum_over_batch", "MTM sums its per-sample losses over the batch instead of averaging", FLIP,
          "nce_noise).float().mean()", "nce_noise).float().sum()"),
    Fault("nce_noise_count_ignored", "MTM draws one noise feature instead of flip.nce_noise (K)", FLIP,
          "ids, cfg.nce_noise, generator,", "ids, 1, generator,"),
    Fault("icl_temperature_ignored", "ICL is built with τ = 1 instead of flip.temperature", FLIP,
          "ICLHead(dt, dv, config.icl_dim, config.temperature)", "ICLHead(dt, dv, config.icl_dim, 1.0)"),
    Fault("pretrain_loss_drops_icl", "Eq. 12's sum leaves out ICL", FLIP,
          "return PretrainOutput(sum(losses.values()),",
          'return PretrainOutput(sum(v for k, v in losses.items() if k != "icl"),'),
    # NCE and InfoNCE (Eq. 10, 11)
    Fault("noise_uniform", "NCE noise drawn uniformly, not by training frequency", FLIP,
          "torch.multinomial(self.noise_probs,", "torch.multinomial(torch.ones_like(self.noise_probs),"),
    Fault("nce_without_log_kq", "NCE logits without the log(K q) correction", FLIP,
          "pos = target_scores - (math.log(k) + target_logq)", "pos = target_scores"),
    Fault("infonce_one_direction", "InfoNCE text→table only", FLIP,
          "return 0.5 * (F.cross_entropy(a_to_b, target) + F.cross_entropy(b_to_a, target))",
          "return F.cross_entropy(a_to_b, target)"),
    Fault("infonce_without_temperature", "InfoNCE logits not divided by τ", FLIP,
          "a_to_b = z_a[rows] @ z_b.t() / temperature\n    b_to_a = z_b[rows] @ z_a.t() / temperature",
          "a_to_b = z_a[rows] @ z_b.t()\n    b_to_a = z_b[rows] @ z_a.t()"),
    # finetuning (Eq. 13-15)
    Fault("alpha_on_text_side", "the joint logit weights the PLM side by α", FLIP,
          "logits = alpha * id_logit + (1 - alpha) * plm_logit", "logits = (1 - alpha) * id_logit + alpha * plm_logit"),
    Fault("finetune_without_aux_bce", "the finetuning loss drops the two auxiliary BCE terms", TRAINER,
          "for aux in out.aux_logits:", "for aux in out.aux_logits[:0]:"),
    # masking (3.3.1)
    Fault("text_mask_covers_field_names", "text masking also masks the tokens before a value", MASKING,
          "inside = (pos >= value_spans[..., :1]) & (pos < value_spans[..., 1:])",
          "inside = (pos >= value_spans[..., :1] - 2) & (pos < value_spans[..., 1:])"),
    Fault("tab_mask_other_id", "the tabular <MASK> is not the shared mask id", MASKING,
          "return ids.masked_fill(chosen, mask_id)", "return ids.masked_fill(chosen, mask_id + 1)"),
    Fault("text_fields_are_table_fields", "the text masks the fields the table masks (drawn ahead)", MASKING,
          "return tab, None if self.token_level else choose_fields(rows, self.num_fields, self.text_ratio, generator)",
          "return tab, None if self.token_level else tab"),
    Fault("text_fields_are_table_fields_in_forward", "the text masks the fields the table masks (drawn in the forward)",
          MASKING, "text = choose_fields(batch, self.num_fields, self.text_ratio, generator, device)",
          "text = tab"),
    Fault("fields_per_sample_truncated", "k = int(ratio · F) instead of max(1, round(ratio · F))", MASKING,
          "return max(1, round(ratio * num_fields))", "return max(1, int(ratio * num_fields))"),
]


def run_tests(scratch: Path, timeout: float) -> tuple[int, list[str], float]:
    """(exit status, failing tests, seconds) of the test selection in ``scratch``."""
    env = {**os.environ, "PYTHONPATH": str(scratch / "src"), "PYTHONDONTWRITEBYTECODE": "1"}
    tick = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-rf", "-p", "no:cacheprovider", *TESTS],
                              cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout)
        status, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired:
        status, output = 124, ""
    failed = re.findall(r"^FAILED (\S+)", output, flags=re.M)
    return status, failed, round(time.monotonic() - tick, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", help="fault names (default: all)")
    parser.add_argument("--name", default="mutations")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    faults = [f for f in FAULTS if not args.only or f.name in args.only]
    with tempfile.TemporaryDirectory(prefix="flipctr-mutations-") as tmp:
        scratch = Path(tmp)
        for folder in ("src", "tests"):
            shutil.copytree(ROOT / folder, scratch / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        check = subprocess.run([sys.executable, "-c", "import flipctr; print(flipctr.__file__)"], cwd=scratch,
                               env={**os.environ, "PYTHONPATH": str(scratch / "src")}, capture_output=True, text=True)
        if not check.stdout.strip().startswith(str(scratch)):
            raise SystemExit(f"the scratch copy is not the code under test: flipctr from {check.stdout.strip()}")
        status, failed, seconds = run_tests(scratch, args.timeout)
        if status != 0:
            raise SystemExit(f"the tests fail without any fault (status {status}: {failed}); fix that first")
        print(f"no fault: the tests pass ({seconds} s)", flush=True)
        rows = []
        for fault in faults:
            path = scratch / "src" / "flipctr" / fault.file
            original = path.read_text()
            if original.count(fault.old) != 1:
                raise SystemExit(f"{fault.name}: the text to replace occurs {original.count(fault.old)} times "
                                 f"in {fault.file}, not once (the code moved: update the fault)")
            path.write_text(original.replace(fault.old, fault.new))
            try:
                status, failed, seconds = run_tests(scratch, args.timeout)
            finally:
                path.write_text(original)
            rows.append({**asdict(fault), "caught": status != 0, "status": status, "failed": failed,
                         "seconds": seconds})
            print(f"{fault.name}: {'caught' if status else 'NOT CAUGHT'} {failed[:1]} ({seconds} s)", flush=True)
    report = {"tests": " ".join(TESTS), "faults": len(rows), "caught": sum(r["caught"] for r in rows), "results": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    lines = [f"# Mutation check: {report['caught']} of {report['faults']} faults caught", "",
             f"`python benchmarks/mutation_check.py`; tests: `pytest {report['tests']}`.", "",
             "| fault | what | file | caught | first failing test |", "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['what']} | {r['file']} | {'yes' if r['caught'] else '**no**'} | "
              f"{r['failed'][0] if r['failed'] else ('status %d' % r['status'] if r['caught'] else '—')} |" for r in rows]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if report["caught"] < report["faults"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
