"""The text cache assembled from each distinct value's tokens (data/pieces.py) gives exactly the
ids, lengths and value spans of tokenizing every prompt whole, truncation included, on ML-1M-,
BookCrossing- and GoodReads-shaped tables; a tokenizer for which it would not (byte-level BPE)
gets whole-prompt tokenization; a custom dataset's prompt length is chosen from its data."""

import json
import logging
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from flipctr.data.prompts import PromptBuilder
from flipctr.data.datasets import DATASETS
from flipctr.data.table import ValueCodes
from flipctr.data.text import build_text_cache, prompts_for, tokenize_prompts
from flipctr.config import DataConfig

from conftest import tiny_tokenizer, write_bx, write_goodreads, write_ml1m

WRITERS = {"ml-1m": write_ml1m, "bookcrossing": write_bx, "goodreads": write_goodreads}
# values where piece and whole-prompt rules could part: spaces around and inside, nothing at all,
# accents precomposed and combining, punctuation inside, a control character, a long value
ODD = [" padded ", "", "Amélie", "Ame\u0301lie", "x.y", "a\tb", "tail\x00", "end ", "12,345.6",
       "word " * 30]


def _table(tmp_path, name: str) -> pd.DataFrame:
    values = DATASETS[name].reader(WRITERS[name](tmp_path / name)).values.reset_index(drop=True).astype(object)
    values = pd.concat([values] * max(1, 40 // len(values)), ignore_index=True)
    for k, odd in enumerate(ODD):  # each odd value in a different field and row
        values.iat[k % len(values), k % values.shape[1]] = odd
    return values


def _tokenizer(values: pd.DataFrame):
    """A WordPiece vocabulary of half the tables' words (the rest are [UNK]) and the template's."""
    words = sorted({w for v in values.to_numpy().ravel() for w in re.findall(r"\w+|[^\w\s]", str(v).lower())})
    return tiny_tokenizer(["is", *words[::2]])


def _assert_equal(folder, report, reference):
    np.testing.assert_array_equal(np.load(folder / "input_ids.npy"), reference.input_ids)
    np.testing.assert_array_equal(np.load(folder / "lengths.npy"), reference.lengths)
    np.testing.assert_array_equal(np.load(folder / "value_spans.npy"), reference.value_spans)
    assert {k: report[k] for k in reference.report} == reference.report


@pytest.mark.parametrize("name", sorted(WRITERS))
@pytest.mark.parametrize("max_length", [10, 24, 64, 512])
def test_assembled_prompts_equal_whole_prompts(tmp_path, name, max_length):
    values = _table(tmp_path, name)
    tokenizer, builder = _tokenizer(values), PromptBuilder(list(values.columns))
    folder = tmp_path / "cache"
    folder.mkdir()
    report = build_text_cache(folder, values, builder, tokenizer, max_length)
    assert report["method"] == "pieces"  # not the fallback: the assembled rows are what is compared
    reference = tokenize_prompts(builder.build(values), tokenizer, max_length)
    _assert_equal(folder, report, reference)
    if max_length <= 24:
        assert report["fields_lost"] > 0  # truncation was exercised
    assert np.load(folder / "input_ids.npy").dtype == np.uint16
    assert sorted(p.name for p in folder.iterdir()) == ["input_ids.npy", "lengths.npy", "value_spans.npy"]


def test_saved_codes_read_in_chunks_equal_the_table(tmp_path, monkeypatch):
    from flipctr.data import text

    monkeypatch.setattr(text, "CHUNK_ROWS", 7)  # rows across chunks
    values = _table(tmp_path, "ml-1m")
    ValueCodes.from_frame(values, list(values.columns)).save(tmp_path)
    saved = ValueCodes.load(tmp_path)
    assert isinstance(saved.codes, np.memmap) and saved.codes.flags.f_contiguous
    tokenizer, builder = _tokenizer(values), PromptBuilder(list(values.columns))
    (tmp_path / "cache").mkdir()
    report = build_text_cache(tmp_path / "cache", saved, builder, tokenizer, 30)
    assert report["method"] == "pieces" and report["distinct_values"]["user ID"] == values["user ID"].nunique()
    _assert_equal(tmp_path / "cache", report, tokenize_prompts(builder.build(values), tokenizer, 30))


def _byte_level_bpe(values: pd.DataFrame):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    prompts = PromptBuilder(list(values.columns)).build(values).texts
    backend.train_from_iterator(prompts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def test_byte_level_bpe_falls_back_to_whole_prompts(tmp_path, caplog):
    """Byte-level BPE merges the space before a value into its first token: the assembly
    differs, the check sees it, and every prompt is tokenized whole (the same cache)."""
    values = _table(tmp_path, "bookcrossing")
    tokenizer, builder = _byte_level_bpe(values), PromptBuilder(list(values.columns))
    (tmp_path / "cache").mkdir()
    with caplog.at_level(logging.INFO, logger="flipctr"):
        report = build_text_cache(tmp_path / "cache", values, builder, tokenizer, 40)
    assert report["method"] == "whole prompts" and "tokenized whole" in caplog.text
    _assert_equal(tmp_path / "cache", report, tokenize_prompts(builder.build(values), tokenizer, 40))


def test_custom_data_prompt_length_is_chosen_from_the_data(tmp_path, tiny_plm, caplog):
    """No data.max_length on custom data: the 99th percentile of its prompts' lengths (capped at
    the encoder's maximum), in the report and the log; a warning when over 1 % lose a field."""
    from flipctr.data.lm_files import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_plm))
    rng = np.random.default_rng(0)
    words = np.array(["toy", "story", "comedy", "drama", "film", "noir", "action"])
    values = pd.DataFrame({"item": [" ".join(rng.choice(words, k)) for k in rng.integers(1, 40, 400)],
                           "user": rng.integers(0, 50, 400).astype(str)})
    codes = ValueCodes.from_frame(values, ["item", "user"])
    data = SimpleNamespace(folder=tmp_path, fields=["item", "user"], name="custom.yaml", value_codes=lambda: codes)
    full = tokenize_prompts(PromptBuilder(data.fields).build(values), tokenizer, 10_000)
    with caplog.at_level(logging.INFO, logger="flipctr"):
        text = prompts_for(data, DataConfig("custom.yaml"), str(tiny_plm))
    assert text.report["max_length"] == int(np.ceil(np.percentile(full.lengths, 99)))
    assert text.report["max_length_from"] == "99th percentile of the data"
    assert text.report["samples_truncated"] <= 0.01 * len(values)  # at most the 1 % above the percentile
    assert "99th percentile" in caplog.text

    tokenizer.model_max_length = 16  # the encoder's limit caps it, and most rows lose a field: warned
    tokenizer.save_pretrained(tiny_plm)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flipctr"):
        text = prompts_for(data, DataConfig("custom.yaml"), str(tiny_plm))
    assert text.report["max_length"] == 16
    assert any(r.levelno == logging.WARNING and "lose a field" in r.message for r in caplog.records)
    assert json.loads((text.folder / "report.json").read_text())["max_length"] == 16
