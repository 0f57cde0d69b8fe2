"""Prompt + response and context + choice are tokenised as one text.

A SentencePiece tokenizer in Llama's legacy mode turns a text's leading space into a lone "▁" piece, so a
response (" some words") or choice (" yes") tokenised on its own gains a token that the joined text does
not have. These tests train a small SentencePiece model with Llama's settings and wrap it the two ways
real Llama-2 checkpoints are read: the ``tokenizer.json`` they ship (Prepend + Replace normalizer, as
transformers 4.x's ``LlamaTokenizerFast`` and ``PreTrainedTokenizerFast`` load it) and the slow
sentencepiece-backed tokenizer with ``legacy=True``.
"""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import sentencepiece as spm
import torch

from tests.tiny import choice_rows, instruction_rows, make_config, make_tokenizer, write_jsonl
from worker.errors import DataError
from worker.model.data import IGNORE, ChoiceItem, encode_joined, encode_pair
from worker.restore.restorelcc.capture import build_probe_inputs
from worker.run.evaluate import _choice_rows, _shared_context, choice_logliks, response_perplexity

PROMPT = "### Instruction:\nName three colours of a river.\n\n### Response:"
RESPONSE = " some words about the river and the colour of water."
PAIRS = [
    (PROMPT, RESPONSE),
    ("### Instruction:\nGive an example sentence.\n\n### Response:", " The people write a good story."),
    ("### Instruction:\nIs water wet?\n\n### Response:", " Yes, it is."),
]
CONTEXT = "Question: is the river water good?\nAnswer:"

_WORDS = (
    "the a of to and in is it that for on with as was by this be are from or at an not have some words model "
    "answer question yes no water river colour city tree song write describe list name explain give three five "
    "example sentence instruction response story person people time year day good new first wet about"
)


def _corpus(n: int = 400) -> list[str]:
    rng, words = random.Random(0), _WORDS.split()
    lines = [
        " ".join(rng.choice(words) for _ in range(rng.randint(4, 14))).capitalize() + rng.choice(".?!:")
        for _ in range(n)
    ]
    return lines + ["### Instruction:", "### Response:", "Question: is it?", "Answer: yes", "Answer: no"] * 20


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    """A 500-piece BPE SentencePiece model trained with Llama's normalizer settings (about 0.1 s)."""
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    with path.open("wb") as fh:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_corpus()), model_writer=fh, vocab_size=500, model_type="bpe",
            byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=False, split_digits=True,
            normalization_rule_name="identity",
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        )
    return path


def _llama2_json(model_file: Path, add_eos: bool = False):
    """The layout of Llama-2's ``tokenizer.json``: BPE with byte fallback, "▁" prepended by the normalizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = generate_merges(vocab, {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    single = "<s> $A </s>" if add_eos else "<s> $A"
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=f"{single} $B", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _llama_slow(model_file: Path):
    """The sentencepiece-backed tokenizer in legacy mode, adding BOS like Llama's slow tokenizer."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    return SentencePieceBackend(vocab_file=str(model_file), legacy=True, special_tokens_pattern="bos",
                                bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module", params=["llama2-json", "slow"])
def tok(request, sp_model):
    return _llama2_json(sp_model) if request.param == "llama2-json" else _llama_slow(sp_model)


@pytest.fixture(scope="module")
def model(sp_model):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(make_config("llama", vocab_size=500))
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return m.eval()


def _ids(tok, text: str, special: bool = True) -> list[int]:
    return list(tok(text, add_special_tokens=special)["input_ids"])


def _pieces(tok, ids: list[int]) -> list[str]:
    return tok.convert_ids_to_tokens(ids)


def _logp(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)


def _loglik(model, ids: list[int], first: int) -> float:
    """Unpadded reference: summed log-probability of ids[first:] given everything before."""
    logp = _logp(model, ids)
    return sum(logp[t - 1, ids[t]].item() for t in range(first, len(ids)))


def test_tokenizers_are_legacy_sentencepiece(tok, sp_model):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    for text in (PROMPT + RESPONSE, CONTEXT + " yes", " some words", "x  y é 123"):
        assert _ids(tok, text) == [1] + sp.encode(text)
    # the trap: a response or choice tokenised on its own starts with a lone "▁"
    assert _pieces(tok, _ids(tok, RESPONSE, False))[:2] == ["▁", "▁some"]
    assert _pieces(tok, _ids(tok, " yes", False)) == ["▁", "▁yes"]


def test_encode_pair_is_the_joint_tokenisation(tok):
    ids, labels = encode_pair(tok, PROMPT, RESPONSE, 512)
    prompt_ids = _ids(tok, PROMPT)
    n = len(prompt_ids)
    assert ids == _ids(tok, PROMPT + RESPONSE)
    assert ids[:n] == prompt_ids and labels[:n] == [IGNORE] * n
    assert labels[n:] == ids[n:]
    assert _pieces(tok, labels[n : n + 2]) == ["▁some", "▁words"]  # no lone "▁" first


def test_encode_pair_truncates_the_response_end(tok):
    full, full_labels = encode_pair(tok, PROMPT, RESPONSE, 512)
    ids, labels = encode_pair(tok, PROMPT, RESPONSE, len(_ids(tok, PROMPT)) + 3)
    assert ids == full[: len(ids)] and labels == full_labels[: len(ids)]
    assert sum(v != IGNORE for v in labels) == 3


def test_training_batches_use_joint_tokens(tok, tmp_path):
    from worker.restore.batches import training_batches

    data = write_jsonl(tmp_path / "train.jsonl", [{"prompt": p, "response": r} for p, r in PAIRS])
    config = SimpleNamespace(train_samples=None, max_seq_len=128, batch_size=8, group_by_length=False,
                             response_eos=False)
    (batch,) = list(training_batches(tok, str(data), config, seed=0)(0))
    got = {}
    for row_ids, mask, labels in zip(batch.input_ids, batch.attention_mask, batch.labels, strict=True):
        n = int(mask.sum())
        got[tuple(row_ids[:n].tolist())] = [v for v in labels[:n].tolist() if v != IGNORE]
    for p, r in PAIRS:
        joint = _ids(tok, p + r)
        assert got[tuple(joint)] == joint[len(_ids(tok, p)) :]


def test_probe_inputs_use_joint_tokens(tok):
    probe = build_probe_inputs(tok, PAIRS, max_len=128, batch_size=2, negatives=[1, 2, 0])

    def rows(batches) -> list[list[int]]:
        return [ids[: int(m.sum())].tolist() for b in batches for ids, m in zip(b.input_ids, b.attention_mask,
                                                                                 strict=True)]

    assert rows(probe.prompt) == [_ids(tok, p) for p, _ in PAIRS]
    assert rows(probe.positive) == [_ids(tok, p + r) for p, r in PAIRS]
    assert rows(probe.negative) == [_ids(tok, p + PAIRS[j][1]) for (p, _), j in zip(PAIRS, [1, 2, 0], strict=True)]


def test_response_perplexity_scores_the_joint_response_tokens(tok, model):
    got = response_perplexity(model, tok, PAIRS, batch_size=2, max_len=128)
    ll = n = 0
    for p, r in PAIRS:
        joint, first = _ids(tok, p + r), len(_ids(tok, p))
        ll, n = ll + _loglik(model, joint, first), n + len(joint) - first
    assert got["tokens"] == n
    assert got["nll"] == pytest.approx(-ll / n, rel=1e-4)


def _training_samples(tok, tmp_path, pairs, max_seq_len=128, response_eos=True):
    from worker.restore.batches import training_samples

    data = write_jsonl(tmp_path / "train.jsonl", [{"prompt": p, "response": r} for p, r in pairs])
    config = SimpleNamespace(train_samples=None, max_seq_len=max_seq_len, response_eos=response_eos)
    return training_samples(tok, str(data), config)[0]


def test_training_samples_end_with_the_eos_that_stops_the_response(tok, tmp_path):
    eos = tok.eos_token_id
    for (p, r), (ids, labels) in zip(PAIRS, _training_samples(tok, tmp_path, PAIRS), strict=True):
        joint, n = _ids(tok, p + r), len(_ids(tok, p))
        assert ids == [*joint, eos]
        assert labels == [IGNORE] * n + joint[n:] + [eos]  # the EOS is trained like a response token
    without = _training_samples(tok, tmp_path, PAIRS, response_eos=False)
    assert [ids for ids, _ in without] == [_ids(tok, p + r) for p, r in PAIRS]


def test_a_response_cut_by_max_len_or_ending_with_eos_gets_no_second_one(tok, tmp_path):
    eos_text = tok.convert_ids_to_tokens(tok.eos_token_id)
    n = len(_ids(tok, PROMPT))
    ((cut_ids, cut_labels),) = _training_samples(tok, tmp_path, [(PROMPT, RESPONSE)], max_seq_len=n + 3)
    assert cut_ids == _ids(tok, PROMPT + RESPONSE)[: n + 3] and tok.eos_token_id not in cut_ids
    ((ids, labels),) = _training_samples(tok, tmp_path, [(PROMPT, RESPONSE + eos_text)])
    assert ids == _ids(tok, PROMPT + RESPONSE + eos_text) and ids[-1] == tok.eos_token_id
    assert ids.count(tok.eos_token_id) == 1 and labels[-1] == tok.eos_token_id


def test_response_perplexity_scores_whether_the_model_stops(tok, model):
    got = response_perplexity(model, tok, PAIRS, batch_size=2, max_len=128)
    eos, stop_nll, top1 = tok.eos_token_id, [], []
    for p, r in PAIRS:
        logp = _logp(model, _ids(tok, p + r))[-1]  # the position after the response's last token
        stop_nll.append(-logp[eos].item())
        top1.append(int(logp.argmax()) == eos)
    assert got["stop_rows"] == len(PAIRS)
    assert got["stop_nll"] == pytest.approx(sum(stop_nll) / len(PAIRS), rel=1e-4)
    assert got["stop_top1"] == sum(top1) / len(PAIRS)
    # a response max_len cuts has no stop to score; the others still do
    longest = max(len(_ids(tok, p + r)) for p, r in PAIRS)
    short = response_perplexity(model, tok, PAIRS, batch_size=2, max_len=longest)
    assert short["stop_rows"] == sum(len(_ids(tok, p + r)) < longest for p, r in PAIRS) < len(PAIRS)
    assert short["rows_cut"] == 0 and short["nll"] == pytest.approx(got["nll"], rel=1e-5)


def test_a_response_ending_with_eos_is_scored_with_it_and_stops_there(tok, model):
    eos_text = tok.convert_ids_to_tokens(tok.eos_token_id)
    got = response_perplexity(model, tok, [(PROMPT, RESPONSE + eos_text)], batch_size=1, max_len=128)
    joint, first = _ids(tok, PROMPT + RESPONSE + eos_text), len(_ids(tok, PROMPT))
    assert joint[-1] == tok.eos_token_id and got["tokens"] == len(joint) - first
    assert got["nll"] == pytest.approx(-_loglik(model, joint, first) / (len(joint) - first), rel=1e-4)
    assert got["stop_nll"] == pytest.approx(-_logp(model, joint)[-2, tok.eos_token_id].item(), rel=1e-4)


def test_one_piece_choices_share_the_context_row(tok, model):
    item = ChoiceItem(CONTEXT, [" yes", " no"], 0)
    joints = [_ids(tok, CONTEXT + c) for c in item.choices]
    ctx = _ids(tok, CONTEXT)
    assert all(j[: len(ctx)] == ctx and len(j) == len(ctx) + 1 for j in joints)
    rows = _choice_rows(tok, [item], 512)
    assert rows == [(ctx, [j[-1] for j in joints], True)]
    assert _pieces(tok, rows[0][1]) == ["▁yes", "▁no"]
    (lls,) = choice_logliks(model, tok, [item], batch_size=2, max_len=512)
    assert lls == pytest.approx([_loglik(model, j, len(ctx)) for j in joints], rel=1e-4)


def test_multi_piece_choices_score_the_joint_tokens(tok, model):
    item = ChoiceItem(CONTEXT, [" some words", " the river is wet"], 1)
    ctx = _ids(tok, CONTEXT)
    joints = [_ids(tok, CONTEXT + c) for c in item.choices]
    rows = _choice_rows(tok, [item], 512)
    assert rows == [(j, j[len(ctx) :], False) for j in joints]
    assert [_pieces(tok, r[1])[0] for r in rows] == ["▁some", "▁the"]
    (lls,) = choice_logliks(model, tok, [item], batch_size=2, max_len=512)
    assert lls == pytest.approx([_loglik(model, j, len(ctx)) for j in joints], rel=1e-4)


def test_a_choice_with_no_tokens_is_a_data_error(tok):
    with pytest.raises(DataError, match="no tokens"):
        _choice_rows(tok, [ChoiceItem(CONTEXT, ["", " yes"], 1)], 512)


def test_shared_row_needs_one_token_after_the_same_context_ids():
    assert _shared_context([([1, 5, 7], 2), ([1, 5, 8], 2)]) == [1, 5]
    assert _shared_context([([1, 5, 7], 2), ([1, 6, 8], 2)]) is None  # context ids differ
    assert _shared_context([([1, 5, 7], 2), ([1, 8], 1)]) is None  # a merged last context token
    assert _shared_context([([1, 5, 7], 2), ([1, 5, 7, 9], 2)]) is None  # a two-token choice


def test_an_appended_eos_is_not_inside_or_after_the_response(sp_model):
    tok = _llama2_json(sp_model, add_eos=True)
    joint = _ids(tok, PROMPT + RESPONSE)
    assert joint[-1] == tok.eos_token_id
    ids, labels = encode_pair(tok, PROMPT, RESPONSE, 512)
    n = len(_ids(tok, PROMPT)) - 1
    assert ids == joint[:-1] and tok.eos_token_id not in ids
    assert labels == [IGNORE] * n + ids[n:]
    rows = _choice_rows(tok, [ChoiceItem(CONTEXT, [" yes", " no"], 0)], 512)
    assert rows[0][0] == _ids(tok, CONTEXT)[:-1] and rows[0][2]


def test_a_prompt_token_merged_with_the_response_counts_as_response():
    tok = make_tokenizer()
    prompt, response = "A model is Pru", "ning weights."
    alone, joint = _ids(tok, prompt), _ids(tok, prompt + response)
    n = len(alone) - 2
    # "P", "ru" alone; "Prun" when joined: both prompt tokens give way to one that spans the boundary
    assert joint[:n] == alone[:n] and _pieces(tok, alone[n:]) == ["P", "ru"] and _pieces(tok, joint)[n] == "Prun"
    assert encode_joined(tok, prompt, response) == (joint, n)
    ids, labels = encode_pair(tok, prompt, response, 512)
    assert ids == joint and labels == [IGNORE] * n + joint[n:]


def _separately(tok, prompt: str, response: str, max_len: int) -> tuple[list[int], list[int]]:
    """The encoding before joint tokenisation, kept as the reference for byte-level tokenizers."""
    p, r = _ids(tok, prompt), _ids(tok, response, False)
    return (p + r)[:max_len], ([IGNORE] * len(p) + r)[:max_len]


def test_byte_level_bpe_encodes_as_before():
    """SmolLM2-style byte-level BPE has no prefix piece: the joint encoding is the old one exactly."""
    tok = make_tokenizer()
    for row in instruction_rows(24):
        for max_len in (16, 512):
            assert encode_pair(tok, row["prompt"], row["response"], max_len) == _separately(
                tok, row["prompt"], row["response"], max_len
            )
    items = [ChoiceItem(r["context"], r["choices"], r["label"]) for r in choice_rows(8)]
    items.append(ChoiceItem(CONTEXT, [" the lazy dog", " a quick fox"], 0))
    for item in items:
        ctx = _ids(tok, item.context)
        conts = [_ids(tok, c, False) for c in item.choices]
        if all(len(c) == 1 for c in conts):
            want = [(ctx, [c[0] for c in conts], True)]
        else:
            want = [(ctx + c, c, False) for c in conts]
        assert _choice_rows(tok, [item], 512) == want


def test_a_long_context_cut_from_the_left_keeps_bos_first(tok):
    long_context = "Question: " + "the river " * 60 + "is it wet?\nAnswer:"
    shared = _choice_rows(tok, [ChoiceItem(long_context, [" yes", " no"], 0)], 16)
    multi = _choice_rows(tok, [ChoiceItem(long_context, [" some words", " the river is wet"], 1)], 16)
    for ids, _, is_shared in shared + multi:
        assert ids[0] == tok.bos_token_id and tok.bos_token_id not in ids[1:]
        assert len(ids) == (15 if is_shared else 16)
    full = _ids(tok, long_context + " some words")
    assert multi[0][0] == full[:1] + full[-15:]  # BOS, then the end of the context and the whole choice
    assert multi[0][1] == full[len(_ids(tok, long_context)):]


def test_a_row_that_already_starts_with_bos_gets_it_once(tok):
    from worker.model.data import encode_text

    templated = tok.bos_token + PROMPT
    assert _ids(tok, templated)[:2] == [tok.bos_token_id] * 2  # what the tokenizer itself does
    assert encode_text(tok, templated, 128) == _ids(tok, PROMPT)
    ids, labels = encode_pair(tok, templated, RESPONSE, 128)
    assert ids == _ids(tok, PROMPT + RESPONSE) and labels.count(IGNORE) == len(_ids(tok, PROMPT))


def test_probe_pairs_without_contrast_are_left_out(tok):
    long_prompt = "### Instruction:\n" + "the river " * 80 + "\n\n### Response:"
    pairs = [*PAIRS, (long_prompt, " first answer"), ("### Instruction:\nSay it.\n\n### Response:", " Yes, it is.")]
    negatives = [1, 2, 0, 0, 2]  # the long prompt fills the window; the last pair's negative is its own response
    probe = build_probe_inputs(tok, pairs, max_len=32, batch_size=2, negatives=negatives)
    assert probe.n == 3 and probe.dropped == 2
    rows = [ids[: int(m.sum())].tolist() for b in probe.positive for ids, m in zip(b.input_ids, b.attention_mask,
                                                                                     strict=True)]
    assert rows == [_ids(tok, p + r)[:32] for p, r in PAIRS]
    assert sum(b.input_ids.shape[0] for b in probe.prompt) == sum(b.input_ids.shape[0] for b in probe.negative) == 3
    plain = build_probe_inputs(tok, pairs, max_len=32, batch_size=2)  # no contrast asked: every pair stays
    assert plain.n == 5 and plain.dropped == 0
