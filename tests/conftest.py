"""Tiny raw files in the exact formats of each dataset, written by the tests themselves."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from flipctr.config import Config


def write_ml1m(folder: Path, n_users: int = 30, n_movies: int = 20, n_ratings: int = 600, seed: int = 0) -> Path:
    """GroupLens ML-1M ``::``-separated latin-1 files; ratings deliberately not in time order."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    genders, ages = "FM", [1, 18, 25, 35, 45, 50, 56]
    users = [f"{u}::{rng.choice(genders)}::{rng.choice(ages)}::{rng.randrange(21)}::{10000 + u % 7}"
             for u in range(1, n_users + 1)]
    genres = ["Action|Comedy", "Drama", "Children's|Animation", "Sci-Fi|War", "Film-Noir"]
    movies = [f"{m}::Movie Ã©t {m} ({1990 + m % 10})::{genres[m % len(genres)]}" for m in range(1, n_movies + 1)]
    ratings = []
    for _ in range(n_ratings):
        u, m = rng.randrange(1, n_users + 1), rng.randrange(1, n_movies + 1)
        # taste: users like movies with the same parity, so a model can learn something
        rating = rng.choice([4, 5, 5]) if (u + m) % 2 == 0 else rng.choice([1, 2, 3])
        ratings.append(f"{u}::{m}::{rating}::{978300000 + rng.randrange(10**6)}")
    (folder / "users.dat").write_bytes(("\n".join(users) + "\n").encode("latin-1"))
    (folder / "movies.dat").write_bytes(("\n".join(movies) + "\n").encode("latin-1"))
    (folder / "ratings.dat").write_bytes(("\n".join(ratings) + "\n").encode("latin-1"))
    return folder


def write_bx(folder: Path, extra_users: int = 0) -> Path:
    """BX-CSV-Dump ``;``-separated quoted latin-1 CSVs with the raw files' oddities: escaped quotes
    in a title, a garbled ISBN, a rating by a user missing from BX-Users, NULL and implausible
    ages, locations with trailing commas, empty parts or more than three parts, year 0,
    publisher "n/a". ``extra_users`` adds users 100.. with a few ratings each (split tests)."""
    folder.mkdir(parents=True, exist_ok=True)
    users = [
        '"1";"nyc, new york, usa";NULL',
        '"2";"stockton, california, usa";"18"',
        '"3";"porto, v.n.gaia, portugal";"244"',
        '"4";"cambridge, england, united kingdom,";"0"',
        '"5";"berlin, , ";"4"',
        '"6";"halifax, nova scotia";"101"',
        '"7";"n/a, n/a, n/a";"60"',
        '"8";"springfield, ohio, usa, ";"5"',
    ] + [f'"{u}";"town, state, usa";"{20 + u % 50}"' for u in range(100, 100 + extra_users)]
    (folder / "BX-Users.csv").write_bytes(
        ('"User-ID";"Location";"Age"\r\n' + "".join(u + "\r\n" for u in users)).encode("latin-1"))
    (folder / "BX-Books.csv").write_bytes((
        '"ISBN";"Book-Title";"Book-Author";"Year-Of-Publication";"Publisher";"Image-URL-S";"Image-URL-M";"Image-URL-L"\r\n'
        '"0195153448";"Classical Mythology";"Mark P. O. Morford";"2002";"Oxford University Press";"s";"m";"l"\r\n'
        '"0002005018";"Clara \\"Callan\\"; a novel";"Richard Bruce Wright";"0";"n/a";"s";"m";"l"\r\n'
        '"0060973129";"Décision in Normandy";"Carlo D\'Este";"1991";"HarperPerennial";"s";"m";"l"\r\n'
        '"3518365479<90";"Garbled";"Someone";"1999";"Nobody";"s";"m";"l"\r\n'
    ).encode("latin-1"))
    ratings = [
        ("1", "0195153448", 0), ("2", "0002005018", 8), ("3", "0060973129", 6),
        ("2", "9999999999", 9),     # ISBN not in BX-Books: dropped
        ("3", "0195153448", 5), ("1", "0002005018", 10),
        ("9", "0195153448", 7),     # user 9 is not in BX-Users: dropped
        ("2", "3518365479<90", 9),  # ISBN of other than letters and digits: dropped
        ("4", "0195153448", 3), ("5", "0060973129", 0), ("6", "0002005018", 7),
        ("7", "0195153448", 9), ("8", "0060973129", 1),
    ] + [(str(u), ("0195153448", "0002005018", "0060973129")[(u + k) % 3], 8 if (u + k) % 2 else 0)
         for u in range(100, 100 + extra_users) for k in range(4)]
    (folder / "BX-Book-Ratings.csv").write_bytes(
        ('"User-ID";"ISBN";"Book-Rating"\r\n' + "".join(f'"{u}";"{i}";"{r}"\r\n' for u, i, r in ratings))
        .encode("latin-1"))
    return folder


def write_goodreads(folder: Path) -> Path:
    """UCSD Book Graph JSON-lines files (gzip), with a rating-0 shelf entry that is no sample."""
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name: str, records: list[dict]) -> None:
        with gzip.open(folder / name, "wt", encoding="utf-8") as fh:
            for r in records:
                fh.write(json.dumps(r) + "\n")

    dump("goodreads_books.json.gz", [
        {"book_id": "1", "title": "Harry Potter", "authors": [{"author_id": "10", "role": ""}],
         "average_rating": "4.5", "text_reviews_count": "100", "num_pages": "300", "is_ebook": "false",
         "format": "Paperback", "publisher": "Scholastic", "publication_year": "1999", "work_id": "100"},
        {"book_id": "2", "title": "Dune", "authors": [{"author_id": "11", "role": ""}],
         "average_rating": "4.2", "text_reviews_count": "50", "num_pages": "", "is_ebook": "true",
         "format": "ebook", "publisher": "", "publication_year": "1965", "work_id": "200"},
    ])
    dump("goodreads_book_authors.json.gz", [{"author_id": "10", "name": "J.K. Rowling"},
                                            {"author_id": "11", "name": "Frank Herbert"}])
    dump("goodreads_book_genres_initial.json.gz", [
        {"book_id": "1", "genres": {"fantasy, paranormal": 50, "children": 80}},
        {"book_id": "2", "genres": {}}])
    dump("goodreads_book_works.json.gz", [{"work_id": "100", "media_type": "book"},
                                          {"work_id": "200", "media_type": "book"}])
    dump("goodreads_interactions.json.gz", [
        {"user_id": "u1", "book_id": "1", "rating": 5, "date_added": "Fri Aug 25 13:55:02 -0700 2017"},
        {"user_id": "u1", "book_id": "2", "rating": 0, "date_added": "Fri Aug 25 13:56:02 -0700 2017"},
        {"user_id": "u2", "book_id": "2", "rating": 2, "date_added": "Mon Jan 02 10:00:00 -0800 2012"},
        {"user_id": "u2", "book_id": "1", "rating": 4, "date_added": "Tue Mar 05 10:00:00 -0800 2013"},
    ])
    return folder


def install_raw(root: Path, name: str, folder: Path) -> None:
    """Register fixture files as a fetched dataset under ``root`` (no verification of canonical hashes)."""
    from flipctr.data.sources import get_dataset

    get_dataset(name, from_path=folder, root=root, verify=False)


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def ml1m_root(tmp_path: Path, data_root: Path) -> Path:
    install_raw(data_root, "ml-1m", write_ml1m(tmp_path / "raw-ml"))
    return data_root


def tiny_config(**train) -> Config:
    """A small, fast configuration for tests."""
    cfg = Config()
    cfg.model.embedding_dim = 4
    cfg.model.dnn_hidden = [8]
    cfg.model.cross_layers = 1
    cfg.model.attention_dim = 4
    cfg.model.cin_layers = [4]
    cfg.model.afn_log_neurons = 4
    cfg.train.batch_size = 32
    cfg.train.epochs = 3
    cfg.train.progress = False
    cfg.train.amp = "off"
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def tiny_tokenizer(words: list[str]):
    """A BERT-style (uncased WordPiece) fast tokenizer over ``words``, digits and ``##`` digits."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = [*specials, *dict.fromkeys([*words, *"0123456789", *(f"##{d}" for d in "0123456789")])]
    backend = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    backend.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


ML1M_WORDS = ["user", "id", "is", "gender", "female", "male", "age", "occupation", "zip", "code", "movie",
              "title", "genre", "-", "(", ")", ".", "/", "action", "drama", "comedy", "film", "noir", "sci",
              "fi", "children", "'", "s", "under", "movie", "et"]


@pytest.fixture
def tiny_plm(tmp_path: Path) -> Path:
    """A tiny BERT and its tokenizer saved as a local model folder (what users point --plm at)."""
    from transformers import BertConfig, BertModel

    tokenizer = tiny_tokenizer(ML1M_WORDS)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=128)
    import torch

    torch.manual_seed(0)
    folder = tmp_path / "tiny-bert"
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def held_out_rows(ml1m_root: Path):
    """The test split of the prepared fixture as raw rows: each field's value and a label column."""
    import numpy as np

    from flipctr.data.cache import PreparedData

    folder = next((ml1m_root / "cache").iterdir())
    test = json.loads((folder / "meta.json").read_text())["sizes"]["test"]
    frame = PreparedData(folder).values().iloc[-test:].astype(object).reset_index(drop=True)
    frame["label"] = np.load(folder / "labels.npy")[-test:]
    return frame


def assert_predicts_as_evaluated(run_folder: Path, ml1m_root: Path, metrics: dict) -> None:
    """`flipctr.load(...).predict` on the raw test rows gives the run's test AUC."""
    import flipctr
    from sklearn.metrics import roc_auc_score

    rows = held_out_rows(ml1m_root)
    scores = flipctr.load(run_folder).predict(rows)
    assert roc_auc_score(rows["label"], scores) == pytest.approx(metrics["test"]["auc"], abs=1e-6)
