"""Incremental detokenizing, stop strings and chat templates on tiny offline tokenizers."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from inference.detokenizer import IncrementalDetokenizer, StopChecker, apply_chat_template
from inference.errors import InvalidParameter

CORPUS = ["hello world, the quick brown fox jumps over the lazy dog"] * 20 + ["héllo 你好 🙂 ok"]
MULTIBYTE = "héllo 你好 🙂 ok"
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _train(pre, dec, vocab: int, specials: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre, dec
    kw = {"initial_alphabet": pre_tokenizers.ByteLevel.alphabet()} if isinstance(dec, decoders.ByteLevel) else {}
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, **kw))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=specials[0])


@pytest.fixture(scope="module")
def byte_bpe() -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE: small enough that CJK and emoji bytes stay split."""
    t = _train(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(), 300, ["<|eos|>"])
    t.chat_template = TEMPLATE
    return t


@pytest.fixture(scope="module")
def metaspace() -> PreTrainedTokenizerFast:
    """SentencePiece style: decode() drops the leading space of a window's first token."""
    return _train(pre_tokenizers.Metaspace(), decoders.Metaspace(), 200, ["</s>"])


def _decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _stream(tok, prompt: list[int], ids: list[int]) -> tuple[list[str], IncrementalDetokenizer]:
    d = IncrementalDetokenizer(tok, prompt)
    return [d.add(t) for t in ids], d


def test_multibyte_chars_really_span_tokens(byte_bpe):
    ids = byte_bpe.encode(MULTIBYTE)
    pieces = [byte_bpe.decode([t]) for t in ids]
    assert any("\ufffd" in p for p in pieces)
    assert byte_bpe.decode(ids) == MULTIBYTE


def test_incremental_equals_full_decode_and_never_emits_half_a_char(byte_bpe):
    prompt = byte_bpe.encode("the quick brown fox")
    ids = byte_bpe.encode(MULTIBYTE)
    deltas, d = _stream(byte_bpe, prompt, ids)
    assert "".join(deltas) == d.text == _decode(byte_bpe, ids) == MULTIBYTE
    assert all("\ufffd" not in x for x in deltas)
    assert "" in deltas  # something was actually held back while a character was incomplete


def test_prefixes_of_stream_are_prefixes_of_text(byte_bpe):
    ids = byte_bpe.encode(MULTIBYTE + " " + MULTIBYTE)
    d = IncrementalDetokenizer(byte_bpe, [])
    for i, t in enumerate(ids):
        d.add(t)
        full = _decode(byte_bpe, ids[: i + 1])
        assert full.rstrip("\ufffd").startswith(d.text) or full.startswith(d.text)
    assert d.text == MULTIBYTE + " " + MULTIBYTE


def test_leading_space_tokenizer_keeps_spaces_between_words(metaspace):
    prompt = metaspace.encode("the lazy")
    ids = metaspace.encode("hello world the quick brown fox")
    assert metaspace.decode(ids[1:2]) and not metaspace.decode(ids[1:2]).startswith(" ")
    deltas, d = _stream(metaspace, prompt, ids)
    # Mid-sequence, a word's leading space belongs to it: the window context restores it.
    assert "".join(deltas) == d.text == _decode(metaspace, prompt + ids)[len(_decode(metaspace, prompt)) :]
    assert d.text.strip() == "hello world the quick brown fox"
    assert any(x.startswith(" ") for x in deltas)


def test_special_tokens_are_skipped(byte_bpe):
    eos = byte_bpe.eos_token_id
    ids = byte_bpe.encode("hello") + [eos] + byte_bpe.encode(" world")
    deltas, d = _stream(byte_bpe, [eos], ids)
    assert d.text == "hello world" and "<|eos|>" not in "".join(deltas)


def test_long_stream_keeps_a_bounded_window(byte_bpe):
    ids = byte_bpe.encode("the quick brown fox jumps over the lazy dog. " * 50)
    _, d = _stream(byte_bpe, byte_bpe.encode("hello"), ids)
    assert d.text == _decode(byte_bpe, ids)
    assert len(d._tokens) < 10  # not re-decoding the whole output each step


def _feed_all(stop: list[str], deltas: list[str]) -> tuple[str, bool, StopChecker]:
    c, out = StopChecker(stop), []
    for x in deltas:
        text, hit = c.feed(x)
        out.append(text)
        if hit:
            return "".join(out), True, c
    return "".join(out) + c.flush(), False, c


def test_stop_spanning_deltas_is_caught_and_not_emitted():
    c = StopChecker(["STOP"])
    assert c.feed("abc ST") == ("abc ", False)  # "ST" held back: it may start "STOP"
    assert c.feed("O") == ("", False)
    assert c.feed("Pxyz") == ("", True)
    assert c.matched == "STOP" and c.flush() == "" and c.feed("more") == ("", True)


def test_stop_spanning_three_deltas_and_earliest_stop_wins():
    text, hit, c = _feed_all(["<|end|>", "lazy"], ["the l", "az", "y dog <|e", "nd|>"])
    assert (text, hit, c.matched) == ("the ", True, "lazy")
    text, hit, _ = _feed_all(["<|end|>"], ["ok<", "|en", "d|>tail"])
    assert (text, hit) == ("ok", True)


def test_false_start_is_released_and_tail_flushed():
    text, hit, _ = _feed_all(["STOP"], ["a S", "Tx b ST", "O"])
    assert (text, hit) == ("a STx b STO", False)
    c = StopChecker(["\n\n"])
    assert c.feed("line\n") == ("line", False)
    assert c.flush() == "\n"


def test_no_stop_strings_pass_through():
    assert StopChecker([]).feed("anything") == ("anything", False)


def test_stop_inside_one_delta_truncates():
    assert _feed_all(["fox"], ["the quick brown fox jumps"])[:2] == ("the quick brown ", True)


def test_apply_chat_template_returns_ids(byte_bpe):
    msgs = [{"role": "user", "content": "hello"}]
    ids = apply_chat_template(byte_bpe, msgs)
    assert isinstance(ids, list) and all(isinstance(t, int) for t in ids)
    assert byte_bpe.decode(ids) == "<|user|>hello<|end|><|assistant|>"
    assert byte_bpe.decode(apply_chat_template(byte_bpe, msgs, add_generation_prompt=False)).endswith("<|end|>")


def test_apply_chat_template_without_template_is_a_clear_error(metaspace):
    with pytest.raises(InvalidParameter) as e:
        apply_chat_template(metaspace, [{"role": "user", "content": "hi"}])
    assert e.value.param == "messages" and "chat template" in e.value.message
