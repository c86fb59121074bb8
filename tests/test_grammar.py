"""Constrained decoding (inference/grammar.py and the sampler's use of it): grammars compile
or fail naming the field, matchers allow exactly the grammar's continuations (end-of-sequence
only where it accepts), and a constrained row never changes its neighbours in a batch.

The unit tests run on a tiny byte-level BPE trained here; the slow ones on the default model."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from inference.config import SamplingParams
from inference.errors import InvalidParameter
from inference.grammar import Grammar, GrammarCompiler, lark_json, masked_rows
from inference.sampler import Sampler, SamplerState

CORPUS = ['{"name": "Ann", "age": 31, "tags": ["a", "b"], "ok": true, "x": null}'] * 20 + ["hello world 0123456789"]
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])


def _allowed(matcher, vocab: int) -> set[int]:
    row = torch.empty((vocab + 31) // 32, dtype=torch.int32)
    matcher.fill_mask(row)
    bits = [(int(row[t // 32]) >> (t % 32)) & 1 for t in range(vocab)]
    return {t for t, b in enumerate(bits) if b}


def _text(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_matcher_allows_only_continuations_and_eos_at_the_end(tokenizer, compiler):
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    m = compiler.matcher(Grammar.json_schema(SCHEMA))
    doc = tokenizer.encode('{"name": "Ann", "age": 31}', add_special_tokens=False)
    for i, t in enumerate(doc):
        allowed = _allowed(m, vocab)
        assert t in allowed and eos not in allowed
        # Every allowed token keeps the text a prefix of some valid document.
        assert all(_text(tokenizer, doc[:i] + [a]).startswith("{") for a in allowed)
        assert m.accept(t)
    assert _allowed(m, vocab) == {eos} and m.done and m.accepting


def test_a_refused_token_ends_the_sequence(tokenizer, compiler):
    m = compiler.matcher(Grammar.json_object())
    assert not m.accept(tokenizer.encode("hello", add_special_tokens=False)[0])
    assert m.done and _allowed(m, len(tokenizer)) == {tokenizer.eos_token_id}  # only the end is left


def test_invalid_grammars_name_the_field(compiler):
    with pytest.raises(InvalidParameter) as e:
        compiler.check(Grammar.json_schema({"type": "objekt"}))
    assert e.value.param == "response_format" and "objekt" in e.value.message
    with pytest.raises(InvalidParameter) as e:
        compiler.check(Grammar.json_schema({"$ref": "#/$defs/missing"}, "tools[1].function.parameters"))
    assert e.value.param == "tools[1].function.parameters"
    with pytest.raises(InvalidParameter):
        compiler.check(Grammar.json_schema({"type": "string", "pattern": "(("}))
    with pytest.raises(InvalidParameter):
        Grammar.json_schema([1, 2])  # type: ignore[arg-type]
    with pytest.raises(InvalidParameter) as e:
        compiler.check(Grammar.lark("start: undefined_rule", "tools"))
    assert e.value.param == "tools"


def test_lark_embeds_json_schemas(tokenizer, compiler):
    g = Grammar.lark(f'start: "<call>" body "</call>"\nbody: {lark_json(SCHEMA)}')
    m = compiler.matcher(g)
    for t in tokenizer.encode('<call>{"name": "Bo", "age": 2}</call>', add_special_tokens=False):
        assert m.accept(t)
    assert m.done and m.accepting


def test_masked_rows_touch_only_their_rows(tokenizer, compiler):
    vocab = len(tokenizer)
    logits = torch.randn(3, vocab)
    before = logits.clone()
    m = compiler.matcher(Grammar.json_object())
    rows = masked_rows(logits, [1], [m])
    assert torch.equal(logits, before)  # the input is never modified
    allowed = _allowed(m, vocab)
    finite = set(torch.isfinite(rows[0]).nonzero().flatten().tolist())
    assert finite == allowed
    assert torch.equal(rows[0][sorted(allowed)], logits[1][sorted(allowed)])


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_a_constrained_row_leaves_its_neighbours_unchanged(tokenizer, compiler, temperature):
    """Unconstrained rows draw the same tokens with or without a constrained row beside
    them; the constrained row always draws an allowed token and ends in valid JSON."""
    vocab, grammar = len(tokenizer), Grammar.json_schema(SCHEMA)
    params = SamplingParams(temperature=temperature, seed=7, max_tokens=100, logprobs=2)
    torch.manual_seed(0)
    steps = [torch.randn(4, vocab) * 3 for _ in range(40)]
    sampler = Sampler()

    def run(constrained: bool):
        states = [SamplerState(params, [1]) for _ in range(4)]
        if constrained:
            states[2].grammar = compiler.matcher(grammar)
        out: list[list] = [[] for _ in states]
        for logits in steps:
            if constrained and states[2].grammar.done:
                break
            allowed = _allowed(states[2].grammar, vocab) if constrained else None
            for i, (s, o) in enumerate(zip(states, sampler(logits, states))):
                if allowed is not None and i == 2:
                    assert o.token_id in allowed
                    # Logprobs are the model's, from before the mask.
                    assert o.logprob == pytest.approx(logits[2].log_softmax(-1)[o.token_id].item(), abs=1e-5)
                out[i].append(o.token_id)
                s.observe(o.token_id)
        return out, states

    free, _ = run(False)
    mixed, states = run(True)
    for i in (0, 1, 3):
        assert mixed[i] == free[i][: len(mixed[i])]
    assert states[2].grammar.done, "random logits should still close the object within 40 tokens"
    doc = json.loads(_text(tokenizer, [t for t in mixed[2] if t != tokenizer.eos_token_id]))
    assert set(doc) == {"name", "age"} and isinstance(doc["age"], int) and len(doc["name"]) <= 8


# -- the default model ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine():
    from inference.config import EngineConfig
    from inference.engine import Engine

    return Engine(EngineConfig(kv_cache_gb=0.1, max_batch=8))


@pytest.mark.slow
def test_engine_batch_with_a_constrained_request_keeps_greedy_text(engine):
    prompt = engine.encode_chat([{"role": "user", "content": "Describe a cat named Tom as JSON."}])
    free = SamplingParams(temperature=0, max_tokens=24)
    grammar = Grammar.json_schema(SCHEMA)
    engine.check_grammar(grammar)
    (alone,) = engine.generate([prompt], free)
    both = engine.generate([prompt, prompt], [free, SamplingParams(temperature=0, max_tokens=60, grammar=grammar)])
    assert both[0] == alone
    tokens, text, reason = both[1]
    assert reason == "stop"
    doc = json.loads(text)
    assert set(doc) == {"name", "age"} and isinstance(doc["age"], int)


HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call functions. Signatures:\n<tools>\n"
    "{%- for t in tools %}\n{{ t | tojson }}{%- endfor %}\n</tools>\nReturn calls as "
    '<tool_call>\n{"name": <name>, "arguments": <args>}\n</tool_call><|im_end|>\n{%- endif %}'
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{%- for c in m.tool_calls or [] %}\n<tool_call>\n"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}\n</tool_call>'
    "{%- endfor %}<|im_end|>\n{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


# Llama 3.1's shape: tools in the prompt, a call is the reply {"name", "parameters"}.
LLAMA3_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nEnvironment: ipython\nFunctions:\n"
    "{%- for t in tools %}\n{{ t | tojson }}{%- endfor %}\nRespond with a JSON object "
    '{"name": function name, "parameters": dictionary of arguments}.<|im_end|>\n{%- endif %}'
    "{%- for m in messages %}<|im_start|>{{ 'ipython' if m.role == 'tool' else m.role }}\n{{ m.content }}"
    "{%- for c in m.tool_calls or [] %}"
    '{"name": "{{ c.function.name }}", "parameters": {{ c.function.arguments | tojson }}}'
    "{%- endfor %}<|im_end|>\n{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


@pytest.mark.slow
@pytest.mark.parametrize("template", [HERMES_TEMPLATE, LLAMA3_TEMPLATE], ids=["hermes", "llama3"])
def test_engine_native_template_required_call_is_valid(engine, monkeypatch, template):
    """Native tool templates (Qwen2's Hermes form, Llama 3's JSON form) on the default model's
    weights: tool_choice "required" forces a call in the family's form whose arguments match
    the function's schema, and the family's parser reads it back."""
    from ui.tool_calls import FunctionTool, ToolFormat, detect_format, prepare_chat

    city = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tools = [FunctionTool("get_weather", "Weather in a city", city | {"additionalProperties": False})]
    history = [
        {"role": "user", "content": "Weather in Rome?"},
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "c0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c0", "content": "sunny"},
        {"role": "user", "content": "And in Oslo?"},
    ]
    setup = prepare_chat(template, history, tools, "required")
    fmt = detect_format(template)
    assert fmt is not ToolFormat.GENERIC and setup.tools is not None and setup.tools.format is fmt
    assert setup.grammar is not None and setup.template_tools is not None
    monkeypatch.setattr(engine.tokenizer, "chat_template", template)
    prompt = engine.encode_chat(setup.messages, setup.template_tools)
    rendered = engine.tokenizer.decode(prompt)
    assert '{"city": "Rome"}}' in rendered and '"name": "get_weather"' in rendered
    engine.check_grammar(setup.grammar)
    _, text, reason = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=60, grammar=setup.grammar))[0]
    content, calls = setup.tools.parser().parse(text)
    if fmt is ToolFormat.HERMES:
        assert text.startswith("<tool_call>\n") and text.endswith("</tool_call>")
    else:
        assert set(json.loads(text)) == {"name", "parameters"}
    assert content is None and len(calls) >= 1, text
    assert calls[0].name == "get_weather" and isinstance(json.loads(calls[0].arguments)["city"], str)
