"""GoodReads scale: a GoodReads-shaped log of any size through the data path, time and peak
memory per stage against rows.

    python benchmarks/scale.py [--rows 1e6 5e6 2e7] [--stages prepare text dcnv2 pretrain]
                               [--compare ml-1m bookcrossing] [--work DIR] [--plm minilm-l6]
                               [--out DIR] [--name scale] [--drop-caches]
    python benchmarks/scale.py --generate ROWS --work DIR [--layout parquet|ucsd]   # data only
    python benchmarks/scale.py --render RESULTS.json   # the .md and .png again from a results file

The generator (deterministic, ``--seed``) writes the paper's 15 GoodReads fields, users and books
drawn with a power-law skew (a few are very frequent, most rare), every book's attributes fixed
per book (title of 1-12 words, genres, author, publisher, pages, year, ...), ratings 1-5 and
increasing times: as a custom Parquet file with its schema (what the benchmark reads), or in the
UCSD layout (``goodreads_interactions.json.gz`` + books, authors, genres, works) that
``flipctr data get goodreads --from`` reads.

Each stage runs in its own process, timed, its peak resident memory read from the kernel
(``VmHWM``, polled while it runs): ``prepare`` (``flipctr data prepare SCHEMA``: the encoded table), ``text`` (``flipctr
data prepare SCHEMA --plm P``: the tokenized prompts, the table cached), ``dcnv2`` (``flipctr
train``: one epoch of DCNv2 on train, then validation and test evaluated), ``pretrain`` (20 FLIP
pretraining steps of the ``cpu`` profile, frozen encoder, on the most recent rows, after loading
the caches). ``--compare`` times the ML-1M and BookCrossing text caches both ways: assembled
from distinct values (the cache) and every prompt tokenized whole (before).

Targets (2 cores): peak RSS <= 8 GiB at 20 M rows in every stage; the text cache of 20 M rows
<= 15 minutes; each stage's time growing no faster than rows (20 M / 1 M <= 25x).
``--drop-caches`` (root) starts every stage from an empty page cache (:func:`settle`).
Writes ``<out>/<name>.{json,md,png}`` (default ``benchmarks/results``); a stage that fails or
runs out of memory is recorded with its exit status, not hidden.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "src"))

GENRES = ["fiction", "fantasy, paranormal", "romance", "mystery, thriller, crime", "history, historical fiction, biography",
          "young-adult", "children", "non-fiction", "poetry", "comics, graphic"]
FORMATS = ["Paperback", "Hardcover", "ebook", "Kindle Edition", "Mass Market Paperback", "Audio CD", "unknown"]
SYLLABLES = ["ka", "lo", "mir", "then", "sa", "ri", "dun", "el", "vor", "ta", "ne", "quin", "bra", "shi", "om",
             "pe", "gal", "wyn", "tor", "is", "an", "cre", "dra", "fu", "li", "mo", "ro", "ster", "val", "zen"]
STAGES = ("prepare", "text", "dcnv2", "pretrain")
PRETRAIN_STEPS, PRETRAIN_BATCH = 20, 64


def _words(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` made-up words of 1-4 syllables (a vocabulary: some tokenize to one piece, most to several)."""
    parts = rng.integers(0, len(SYLLABLES), (n, 4))
    counts = rng.integers(1, 5, n)
    syllables = np.array(SYLLABLES, dtype=object)
    return np.array(["".join(syllables[p[:c]]) for p, c in zip(parts, counts)], dtype=object)


def _phrases(rng: np.random.Generator, vocab: np.ndarray, n: int, low: int, high: int) -> np.ndarray:
    """``n`` phrases of ``low``..``high`` words, frequent words more often (Zipf-like)."""
    lengths = rng.integers(low, high + 1, n)
    picks = _skewed(rng, len(vocab), int(lengths.sum()))
    words = vocab[picks]
    ends = np.cumsum(lengths)
    return np.array([" ".join(words[e - k:e]) for e, k in zip(ends, lengths)], dtype=object)


def _skewed(rng: np.random.Generator, n: int, size: int, power: float = 2.5) -> np.ndarray:
    """``size`` draws from ``range(n)`` with density ~ x^(1/power - 1): item 0 most frequent."""
    return np.minimum((n * rng.random(size) ** power).astype(np.int64), n - 1)


def book_table(rows: int, seed: int) -> dict[str, np.ndarray]:
    """Every book's attributes (one row per book; ~rows/10 books, ~books/4 authors)."""
    rng = np.random.default_rng(seed)
    books, authors = max(10, rows // 10), max(5, rows // 40)
    vocab = _words(rng, 20_000)
    author_names = _phrases(rng, vocab, authors, 2, 3)
    publishers = _phrases(rng, vocab, 3_000, 1, 3)
    author = _skewed(rng, authors, books)
    genre_sets = [", ".join(GENRES[g] for g in sorted(set(rng.integers(0, len(GENRES), k).tolist())))
                  for k in rng.integers(1, 4, books)]
    return {
        "book_id": np.arange(1, books + 1).astype(str).astype(object),
        "title": _phrases(rng, vocab, books, 1, 12),
        "genres": np.array(genre_sets, dtype=object),
        "average_rating": np.round(rng.normal(3.9, 0.35, books).clip(1, 5), 2).astype(str).astype(object),
        "text_reviews_count": rng.geometric(0.01, books).astype(str).astype(object),
        "author_id": (author + 1).astype(str).astype(object),
        "author_name": author_names[author],
        "num_pages": rng.integers(24, 900, books).astype(str).astype(object),
        "is_ebook": np.where(rng.random(books) < 0.2, "true", "false").astype(object),
        "format": np.array(FORMATS, dtype=object)[rng.integers(0, len(FORMATS), books)],
        "publisher": publishers[_skewed(rng, len(publishers), books)],
        "publication_year": rng.integers(1950, 2018, books).astype(str).astype(object),
        "work_id": (np.arange(books) * 7 + 3).astype(str).astype(object),
        "media_type": np.where(rng.random(books) < 0.97, "book", "unknown").astype(object),
    }


def interaction_chunks(rows: int, books: int, seed: int, chunk: int = 1_000_000):
    """(user ids, book indices, ratings, seconds) in chunks, times increasing."""
    users = max(10, rows // 25)
    rng = np.random.default_rng(seed + 1)
    start = 1_200_000_000
    for first in range(0, rows, chunk):
        n = min(chunk, rows - first)
        user = (_skewed(rng, users, n, 2.0) + 1).astype(str).astype(object)
        book = _skewed(rng, books, n)
        rating = rng.choice(np.arange(1, 6), n, p=[0.04, 0.08, 0.22, 0.34, 0.32]).astype(np.int8)
        seconds = start + (first + np.arange(n)) * 20
        yield user, book, rating, seconds


FIELDS = {"user ID": "user_id", "book ID": "book_id", "book title": "title", "book genres": "genres",
          "average rating": "average_rating", "number of reviews": "text_reviews_count", "author ID": "author_id",
          "author name": "author_name", "number of pages": "num_pages", "ebook flag": "is_ebook", "format": "format",
          "publisher": "publisher", "publication year": "publication_year", "work ID": "work_id",
          "media type": "media_type"}


def generate_parquet(rows: int, folder: Path, seed: int = 0) -> Path:
    """``goodreads-<rows>.parquet`` + ``goodreads-<rows>.yaml`` (custom schema); returns the schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    schema_path = folder / f"goodreads-{rows}.yaml"
    if schema_path.exists():
        return schema_path
    books = book_table(rows, seed)
    path = folder / f"goodreads-{rows}.parquet"
    tmp = path.with_suffix(".tmp")
    writer = None
    for user, book, rating, seconds in interaction_chunks(rows, len(books["book_id"]), seed):
        columns = {"user_id": user, **{k: v[book] for k, v in books.items()}, "rating": rating,
                   "date_added": seconds}
        batch = pa.table({k: pa.array(v) for k, v in columns.items()})
        writer = writer or pq.ParquetWriter(tmp, batch.schema)
        writer.write_table(batch)
    writer.close()
    tmp.replace(path)
    schema = {"name": f"goodreads-{rows}", "file": path.name, "fields": FIELDS,
              "label": {"column": "rating", "threshold": 3}, "order": "date_added"}
    schema_path.write_text(json.dumps(schema, indent=2) + "\n")  # JSON is YAML
    return schema_path


def generate_ucsd(rows: int, folder: Path, seed: int = 0) -> Path:
    """The UCSD Book Graph files (gzip JSON lines) the GoodReads reader reads."""
    folder.mkdir(parents=True, exist_ok=True)
    books = book_table(rows, seed)

    def dump(name: str, records) -> None:
        tmp = folder / f"{name}.tmp"
        with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=1) as fh:
            for r in records:
                fh.write(json.dumps(r) + "\n")
        tmp.replace(folder / name)

    n = len(books["book_id"])
    keys = ("book_id", "title", "average_rating", "text_reviews_count", "num_pages", "is_ebook", "format",
            "publisher", "publication_year", "work_id")
    dump("goodreads_books.json.gz", ({**{k: books[k][i] for k in keys},
                                      "authors": [{"author_id": books["author_id"][i], "role": ""}]} for i in range(n)))
    authors = dict(zip(books["author_id"], books["author_name"]))
    dump("goodreads_book_authors.json.gz", ({"author_id": a, "name": name} for a, name in authors.items()))
    dump("goodreads_book_genres_initial.json.gz",
         ({"book_id": books["book_id"][i], "genres": {g: 10 * (3 - k) for k, g in enumerate([books["genres"][i]])}}
          for i in range(n)))
    dump("goodreads_book_works.json.gz", ({"work_id": books["work_id"][i], "media_type": books["media_type"][i]}
                                          for i in range(n)))

    def interactions():
        for user, book, rating, seconds in interaction_chunks(rows, n, seed):
            stamps = time.strftime  # the UCSD date format, e.g. "Fri Aug 25 13:55:02 -0700 2017"
            for u, b, r, s in zip(user, book, rating, seconds):
                yield {"user_id": u, "book_id": books["book_id"][b], "rating": int(r),
                       "date_added": stamps("%a %b %d %H:%M:%S +0000 %Y", time.gmtime(int(s)))}
    dump("goodreads_interactions.json.gz", interactions())
    return folder


def _cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def _peak_rss(pid: int) -> int:
    """The process's own high-water mark of resident memory (kB; 0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next((int(line.split()[1]) for line in fh if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


def run_stage(command: list[str], env: dict[str, str], log: Path) -> dict:
    """A stage in its own process: wall seconds, peak RSS (GiB) and exit status. The peak is the
    process's own ``VmHWM`` read every 0.1 s while it runs (``wait4``'s ``ru_maxrss`` would not
    do: Linux carries the parent's peak across ``exec`` into it)."""
    tick = time.perf_counter()
    with open(log, "ab") as fh:
        fh.write(f"\n$ {' '.join(command)}\n".encode())
        fh.flush()
        proc = subprocess.Popen(command, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _peak_rss(proc.pid))
            time.sleep(0.1)
    return {"seconds": round(time.perf_counter() - tick, 1), "peak_rss_gib": round(peak / 2**20, 2),
            "exit": proc.returncode}


def settle(env: dict[str, str]) -> str:
    """Before a stage: the kernel's page cache written back and emptied (root only), then the
    libraries imported once, untimed. Every stage then starts alike, its input files on disk and
    its code warm, instead of paying to write back and evict the pages earlier stages left."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as err:
        return f"not dropped ({err.strerror})"
    subprocess.run([sys.executable, "-c", "import flipctr.cli, torch, transformers, pyarrow.parquet"],
                   env=env, cwd=ROOT, check=True)
    return "dropped before each stage, libraries imported once after"


def pretrain_stage(schema: str, plm: str) -> None:
    """20 pretraining steps of the cpu profile (frozen encoder) on the most recent rows."""
    import dataclasses
    import tempfile

    from flipctr.data.cache import prepare, resolve_data_config
    from flipctr.profiles import profile_config
    from flipctr.runtime.device import Runtime
    from flipctr.runs.flip import ENCODING, pretraining_setup
    from flipctr.runs.inputs import ModelInputs

    cfg = profile_config("cpu", [f"data.dataset={schema}", f"model.plm={plm}", "pretrain.epochs=1",
                                 f"pretrain.batch_size={PRETRAIN_BATCH}", f"pretrain.rows={PRETRAIN_STEPS * PRETRAIN_BATCH}",
                                 "pretrain.rows_from=last", "pretrain.progress=false"])
    cfg = dataclasses.replace(cfg, data=resolve_data_config(cfg.data))
    data = prepare(cfg.data)
    runtime = Runtime.create("cpu", cfg.pretrain.amp)
    rd = ModelInputs(data, cfg, runtime.device, text=True)
    with tempfile.TemporaryDirectory() as tmp:
        model, split, pretrainer = pretraining_setup(cfg, rd, data.encoding(ENCODING), runtime.device, Path(tmp))
        tick = time.perf_counter()
        history = pretrainer.fit(model, split)
    print(json.dumps({"steps": history[-1]["steps"], "fit_seconds": round(time.perf_counter() - tick, 1)}))


def compare_stage(dataset: str, plm: str, method: str) -> None:
    """One dataset's text cache built one way, timed in this process."""
    import tempfile

    from flipctr.config import DataConfig
    from flipctr.data.cache import prepare
    from flipctr.data.lm_files import load_tokenizer
    from flipctr.data.prompts import PromptBuilder
    from flipctr.data.datasets import prompt_length
    from flipctr.data.text import build_text_cache, tokenize_prompts

    data = prepare(DataConfig(dataset))
    tokenizer, builder = load_tokenizer(plm), PromptBuilder(data.fields)
    max_length = prompt_length(DataConfig(dataset), dataset)
    tick = time.perf_counter()
    if method == "pieces":
        with tempfile.TemporaryDirectory() as tmp:
            report = build_text_cache(Path(tmp), data.value_codes(), builder, tokenizer, max_length)
        assert report["method"] == "pieces", report["method"]
    else:
        tokenize_prompts(builder.build(data.values()), tokenizer, max_length)
    print(json.dumps({"rows": data.sizes.total, "seconds": round(time.perf_counter() - tick, 1)}))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for stage in STAGES:
        points = [(r["rows"], r["stages"][stage]) for r in results["sizes"] if stage in r["stages"]]
        points = [(n, s) for n, s in points if s["exit"] == 0]
        if points:
            left.plot([n for n, _ in points], [s["seconds"] for _, s in points], marker="o", label=stage)
            right.plot([n for n, _ in points], [s["peak_rss_gib"] for _, s in points], marker="o", label=stage)
    for ax, label in ((left, "seconds"), (right, "peak RSS (GiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("rows")
        ax.set_ylabel(label)
        ax.legend()
    right.axhline(8, color="grey", linestyle="--")
    fig.suptitle("GoodReads-shaped data, 2 cores")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(results: dict) -> str:
    lines = ["# GoodReads scale: time and peak memory per stage", "", f"Command: `{results['command']}`", "",
             f"Machine: {results['machine']}", ""]
    if results.get("rss_method") != "VmHWM":
        lines += ["Peak RSS of this run was read with `wait4` (`ru_maxrss`), which on Linux also holds the "
                  "parent's peak before `exec`: the benchmark's own process, which had generated the data. "
                  "A value at or below that peak is an upper bound, not the stage's own; values above it "
                  "are the stage's. The script now polls each stage's own `VmHWM`.", ""]
    if results.get("page_cache"):
        lines += [f"Page cache: {results['page_cache']}.", ""]
    if results.get("note"):  # what the command line does not say (e.g. another job on the cores)
        lines += [results["note"], ""]
    lines += ["| rows | stage | seconds | peak RSS (GiB) | exit |", "|---|---|---|---|---|"]
    for size in results["sizes"]:
        for stage, s in size["stages"].items():
            lines.append(f"| {size['rows']:,} | {stage} | {s['seconds']} | {s['peak_rss_gib']} | {s['exit']} |")
    if results.get("growth"):
        lines += ["", "Growth from the smallest to the largest size (time ratio / rows ratio):", ""]
        lines += [f"- {stage}: {g['time_ratio']}x time for {g['rows_ratio']}x rows" for stage, g in results["growth"].items()]
    if results.get("compare"):
        lines += ["", "Text cache of the paper's datasets, assembled from distinct values vs every prompt tokenized whole:",
                  "", "| dataset | rows | pieces (s) | whole prompts (s) | speed-up | peak RSS pieces / whole (GiB) |",
                  "|---|---|---|---|---|---|"]
        for name, c in results["compare"].items():
            lines.append(f"| {name} | {c['rows']:,} | {c['pieces']['seconds']} | {c['whole']['seconds']} | "
                         f"{c['speedup']}x | {c['pieces']['peak_rss_gib']} / {c['whole']['peak_rss_gib']} |")
    lines += ["", "Targets: peak RSS <= 8 GiB at 20 M rows in every stage; text cache of 20 M rows <= 15 min; "
              "time growing no faster than rows (20 M / 1 M <= 25x)."]
    largest = max(results["sizes"], key=lambda r: r["rows"], default=None)
    if largest is not None and largest["rows"] >= 20_000_000:
        lines += ["", f"At {largest['rows']:,} rows:", ""]
        for stage, m in largest["stages"].items():
            lines.append(f"- {stage}: peak RSS {m['peak_rss_gib']} GiB ({'met' if m['peak_rss_gib'] <= 8 else 'NOT met'})"
                         + (f", {m['seconds']} s ({'met' if m['seconds'] <= 900 else 'NOT met'})" if stage == "text" else ""))
        for stage, g in results.get("growth", {}).items():
            bound = 1.25 * g["rows_ratio"]
            lines.append(f"- {stage} time growth {g['time_ratio']}x for {g['rows_ratio']}x rows "
                         f"(<= {bound:g}x: {'met' if g['time_ratio'] <= bound else 'NOT met'})")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=float, nargs="*", default=[1e6, 5e6, 2e7])
    parser.add_argument("--stages", nargs="*", default=list(STAGES), choices=STAGES)
    parser.add_argument("--compare", nargs="*", default=[], choices=["ml-1m", "bookcrossing"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/flipctr-scale"))
    parser.add_argument("--plm", default="minilm-l6")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="scale")
    parser.add_argument("--generate", type=float, help="only write the data of this many rows")
    parser.add_argument("--layout", choices=["parquet", "ucsd"], default="parquet")
    parser.add_argument("--drop-caches", action="store_true",
                        help="empty the page cache before each stage (root; see settle())")
    parser.add_argument("--render", type=Path, help="write the .md and .png of this results file again")
    parser.add_argument("--pretrain-stage", nargs=2, metavar=("SCHEMA", "PLM"), help=argparse.SUPPRESS)
    parser.add_argument("--compare-stage", nargs=3, metavar=("DATASET", "PLM", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pretrain_stage:
        return pretrain_stage(*args.pretrain_stage)
    if args.compare_stage:
        return compare_stage(*args.compare_stage)
    if args.render:
        results = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(markdown(results))
        return plot(results, args.render.with_suffix(".png"))
    if args.generate:
        rows = int(args.generate)
        made = (generate_ucsd(rows, args.work / f"ucsd-{rows}", args.seed) if args.layout == "ucsd"
                else generate_parquet(rows, args.work, args.seed))
        return print(made)

    from flipctr.data.lm_files import resolve_language_model
    from flipctr.runtime.environment import environment_info
    from flipctr.utils import write_json, write_text

    plm = resolve_language_model(args.plm)  # a folder: the isolated data home below has no models
    args.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FLIPCTR_DATA": str(args.work / "home"), "PYTHONPATH": str(ROOT / "src")}
    log = args.work / "stages.log"
    results = {"command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]), "rss_method": "VmHWM",
               "machine": f"{os.cpu_count()} cores, {_cpu_model()}", "environment": environment_info("cpu"),
               "sizes": [], "compare": {}}
    py = [sys.executable]
    for rows in map(int, args.rows):
        tick = time.perf_counter()
        schema = generate_parquet(rows, args.work, args.seed)
        size = {"rows": rows, "generate_seconds": round(time.perf_counter() - tick, 1), "stages": {}}
        commands = {
            "prepare": [*py, "-m", "flipctr.cli", "data", "prepare", str(schema)],
            "text": [*py, "-m", "flipctr.cli", "data", "prepare", str(schema), "--plm", plm],
            "dcnv2": [*py, "-m", "flipctr.cli", "train", "--dataset", str(schema), "--model", "dcnv2",
                      "--run-dir", str(args.work / f"dcnv2-{rows}"), "--set", "train.epochs=1", "--set", "train.refit=false",
                      "--set", "train.progress=false"],
            "pretrain": [*py, str(Path(__file__).resolve()), "--pretrain-stage", str(schema), plm],
        }
        for stage in STAGES:  # in order: each later stage reads the caches the earlier ones wrote
            if stage in args.stages:
                if args.drop_caches:
                    results["page_cache"] = settle(env)
                size["stages"][stage] = run_stage(commands[stage], env, log)
                print(f"[scale] {rows:,} rows  {stage}: {size['stages'][stage]}", flush=True)
        results["sizes"].append(size)
        write_json(args.out / f"{args.name}.json", results)  # after each size: a killed run keeps its table
    for dataset in args.compare:
        runs = {}
        for method in ("pieces", "whole"):
            if args.drop_caches:
                settle(os.environ)
            runs[method] = run_stage([*py, str(Path(__file__).resolve()), "--compare-stage", dataset, plm, method],
                                     os.environ, log)
        rows_line = [json.loads(line) for line in log.read_text().splitlines() if line.startswith('{"rows"')][-1]
        results["compare"][dataset] = {"rows": rows_line["rows"], **runs,
                                       "speedup": round(runs["whole"]["seconds"] / max(runs["pieces"]["seconds"], 0.1), 1)}
        print(f"[scale] {dataset}: {results['compare'][dataset]}", flush=True)
    sizes = results["sizes"]
    if len(sizes) > 1:
        first, last = sizes[0], sizes[-1]
        results["growth"] = {s: {"rows_ratio": round(last["rows"] / first["rows"], 1),
                                 "time_ratio": round(last["stages"][s]["seconds"] / max(first["stages"][s]["seconds"], 0.1), 1)}
                             for s in last["stages"] if s in first["stages"]}
    write_json(args.out / f"{args.name}.json", results)
    write_text(args.out / f"{args.name}.md", markdown(results))
    plot(results, args.out / f"{args.name}.png")


if __name__ == "__main__":
    main()
