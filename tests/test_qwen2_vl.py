"""Qwen2-VL against transformers on a tiny random checkpoint: a prompt with two pictures of
different sizes, float32 logits within 1e-4 over a chunked prefill and 10 cached decode
steps, in one process, split by hand over pipeline stages, and over a real gRPC ring
(the vision tower on the master, stages fed hidden states and [3, T] positions)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from inference.config import EngineConfig, LayerRange, SamplingParams
from inference.engine import Engine, load_tokenizer
from inference.errors import InvalidParameter
from inference.kv_cache import KVCacheManager
from inference.loader import load_model
from inference.model_runner import ModelRunner
from inference.multimodal import ImageInputs
from inference.scheduler import ScheduledSeq
from inference.sequence import Sequence
from tests.tiny_vl import IMAGE_PAD, make_tiny_vl, picture

TOL = 1e-4
DECODE_STEPS = 10
NUM_BLOCKS, BLOCK = 64, 4
MESSAGES = [
    {
        "role": "user",
        "content": [
            {"type": "image"},
            {"type": "text", "text": "Compare this picture"},
            {"type": "image"},
            {"type": "text", "text": "with that one."},
        ],
    }
]


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    """The tiny model, its prompt with two pictures, and transformers' logits for it."""
    path = tmp_path_factory.mktemp("qwen2vl")
    hf = make_tiny_vl(path)
    engine = Engine(EngineConfig(model=str(path), block_size=BLOCK, max_batch_tokens=32), num_blocks=NUM_BLOCKS)
    ids, images = engine.encode_chat_images(MESSAGES, [picture(56, 84, 1), picture(120, 70, 2)])
    return SimpleNamespace(path=path, hf=hf, engine=engine, ids=ids, images=images, ref=_reference(hf, ids, images))


def _reference(hf, ids: list[int], images: ImageInputs) -> SimpleNamespace:
    """transformers' prefill logits, then greedy decode steps on its own KV cache."""
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = hf(
            input_ids=input_ids,
            pixel_values=images.pixel_values,
            image_grid_thw=torch.tensor(images.grids),
            mm_token_type_ids=(input_ids == IMAGE_PAD).int(),
            use_cache=True,
        )
        prefill, past = out.logits[0], out.past_key_values
        tokens, steps = [], []
        nxt = int(prefill[-1].argmax())
        for _ in range(DECODE_STEPS):
            tokens.append(nxt)
            out = hf(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.logits[0, -1])
            nxt = int(out.logits[0, -1].argmax())
        rope, _ = hf.model.get_rope_index(input_ids, (input_ids == IMAGE_PAD).int(), torch.tensor(images.grids))
    return SimpleNamespace(prefill=prefill, steps=steps, tokens=tokens + [nxt], positions=rope[:, 0])


class Chain:
    """Stages run back to back by hand over the paged KV cache, each with its own tensors."""

    def __init__(self, path, ranges: list[LayerRange]):
        self.kv = KVCacheManager(NUM_BLOCKS, BLOCK)
        self.runners = []
        for rng in ranges:
            loaded = load_model(str(path), layers=rng)
            self.runners.append(
                ModelRunner(loaded.model, loaded.config, loaded.layers, NUM_BLOCKS, BLOCK, torch.float32, "cpu")
            )

    def step(self, seq: Sequence, n: int) -> torch.Tensor:
        self.kv.allocate(seq, seq.num_computed_tokens + n)
        inputs = self.runners[0].prepare([ScheduledSeq(seq, n)])
        hidden = None
        for r in self.runners:
            hidden = r.forward(inputs, hidden)
        seq.num_computed_tokens += n
        return next(r for r in self.runners if r.layers.head).model.compute_logits(hidden)


def test_prompt_layout_matches_transformers(vl):
    assert len(vl.images.grids) == 2 and vl.images.grids[0] != vl.images.grids[1]
    counts = [t * h * w // 4 for t, h, w in vl.images.grids]
    assert vl.ids.count(IMAGE_PAD) == sum(counts)
    assert torch.equal(vl.images.positions, vl.ref.positions)


def test_prefix_cache_keys_pictures_by_content(vl):
    """Image pads are one token id for every picture: the keys a prefix cache sees replace
    them by the picture's content, so the same picture hits and another never does."""
    engine = vl.engine
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
    one = engine.encode_chat_images(msgs, [picture(56, 56, 1)])
    same = engine.encode_chat_images(msgs, [picture(56, 56, 1)])
    other = engine.encode_chat_images(msgs, [picture(56, 56, 2)])
    assert one[0] == other[0]  # the same token ids...
    keys = [Sequence(ids, SamplingParams(), images=images).cache_tokens for ids, images in (one, same, other)]
    assert keys[0] == keys[1] and keys[0] != keys[2]  # ...but not the same keys
    pads = [i for i, t in enumerate(one[0]) if t == IMAGE_PAD]
    assert all(keys[0][i] < 0 and keys[0][i] != keys[2][i] for i in pads)
    assert all(keys[0][i] == one[0][i] for i in range(len(one[0])) if i not in pads)
    assert len(set(keys[0][i] for i in pads)) == len(pads)  # each token of a picture its own key
    # A later turn with the first picture again keys its tokens the same way.
    turn2 = [*msgs, {"role": "assistant", "content": "x"}, *msgs]
    ids2, images2 = engine.encode_chat_images(turn2, [picture(56, 56, 1), picture(56, 56, 2)])
    assert Sequence(ids2, SamplingParams(), images=images2).cache_tokens[: len(one[0])] == keys[0]


@pytest.mark.parametrize("split", ["whole", "stages"])
def test_logits_match_transformers(vl, split):
    n = 2
    if split == "whole":
        ranges = [LayerRange(0, n, n)]
    else:  # a pipeline master (embedding, vision tower, head) and two one-layer stages
        ranges = [LayerRange(0, 0, n, embed=True, head=True), LayerRange(0, 1, n, False, False)]
        ranges.append(LayerRange(1, 2, n, False, False))
    chain = Chain(vl.path, ranges)
    if split == "stages":
        assert chain.runners[1].model.visual is None and chain.runners[0].model.visual is not None
    images = ImageInputs.build(vl.ids, IMAGE_PAD, vl.images.pixel_values, vl.images.grids, 2)
    seq = Sequence(vl.ids, SamplingParams(temperature=0), images=images)
    # Two prefill chunks: the cut falls inside the first picture's tokens.
    cut = vl.ids.index(IMAGE_PAD) + 3
    ours = torch.cat([chain.step(seq, cut), chain.step(seq, len(vl.ids) - cut)])
    assert (ours - vl.ref.prefill).abs().max().item() < TOL
    assert images.embeds is None  # dropped once the prompt is cached
    for tok, ref in zip(vl.ref.tokens, vl.ref.steps):
        seq.append_token(tok)
        got = chain.step(seq, 1)[-1]
        assert (got - ref).abs().max().item() < TOL


def test_qwen2_5_vl_window_attention_matches_transformers(tmp_path):
    """Qwen2.5-VL: the same decoder; a tower with RMSNorm, a gated MLP and window attention."""
    hf = make_tiny_vl(tmp_path, windowed=True)
    loaded = load_model(str(tmp_path))
    assert loaded.config.vision is not None and loaded.config.vision.windowed
    engine = Engine(EngineConfig(model=str(tmp_path), block_size=BLOCK), loaded=loaded, num_blocks=NUM_BLOCKS)
    ids, images = engine.encode_chat_images(MESSAGES, [picture(56, 84, 1), picture(120, 70, 2)])
    ref = _reference(hf, ids, images)
    chain = Chain(tmp_path, [LayerRange(0, 2, 2)])
    seq = Sequence(ids, SamplingParams(temperature=0), images=images)
    assert (chain.step(seq, len(ids)) - ref.prefill).abs().max().item() < TOL
    for tok, step in zip(ref.tokens, ref.steps):
        seq.append_token(tok)
        assert (chain.step(seq, 1)[-1] - step).abs().max().item() < TOL


def test_engine_greedy_with_a_text_request_alongside(vl):
    """The engine path: a batch mixing the picture prompt (M-RoPE rows) with a text prompt."""
    greedy = SamplingParams(temperature=0, max_tokens=DECODE_STEPS + 1, ignore_eos=True)
    engine = vl.engine
    text = engine.encode_chat([{"role": "user", "content": "just text"}])
    solo = engine.generate([text], greedy)[0][0]
    a = engine.add_request(vl.ids, greedy, images=vl.images)
    b = engine.add_request(text, greedy)
    got: dict[int, list[int]] = {a: [], b: []}
    while engine.has_work:
        for out in engine.step():
            got[out.seq_id] += out.token_ids
    assert got[a] == vl.ref.tokens
    assert got[b] == solo


def test_prefix_cache_hits_the_same_pictures_only(vl):
    """Run the picture prompt twice: the second run takes its KV from the prefix cache (image
    tokens included, later chunks merging pictures after a cached start) and says the same.
    The same prompt with another picture hits only the text before that picture."""
    engine = vl.engine
    if getattr(engine.kv, "tree", None) is None:
        pytest.skip("the prefix cache is off")
    greedy = SamplingParams(temperature=0, max_tokens=DECODE_STEPS + 1, ignore_eos=True)

    def run(ids, images) -> tuple[list[int], int]:
        sid = engine.add_request(ids, greedy, images=images)
        tokens, cached = [], 0
        while engine.has_work:
            for o in engine.step():
                if o.seq_id == sid:
                    tokens += o.token_ids
                    cached = o.num_cached_tokens
        return tokens, cached

    run(vl.ids, vl.images)
    tokens, cached = run(vl.ids, vl.images)
    assert tokens == vl.ref.tokens and cached >= len(vl.ids) - 2 * BLOCK
    first_pad = vl.ids.index(IMAGE_PAD)
    ids, images = engine.encode_chat_images(MESSAGES, [picture(56, 84, 7), picture(120, 70, 2)])
    assert ids == vl.ids
    _, cached = run(ids, images)
    assert cached <= first_pad


def test_hub_config_of_qwen2_vl_2b_parses():
    """The flat config.json of Qwen/Qwen2-VL-2B-Instruct on the hub (M-RoPE under the old
    rope_scaling "type": "mrope"), not the nested one transformers 5 writes."""
    from inference.config import ModelConfig

    hub = {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_attention_heads": 12,
        "num_hidden_layers": 28,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "vocab_size": 151936,
        "eos_token_id": 151645,
        "image_token_id": 151655,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_config": {
            "depth": 32,
            "embed_dim": 1280,
            "mlp_ratio": 4,
            "num_heads": 16,
            "in_chans": 3,
            "hidden_size": 1536,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    }
    cfg = ModelConfig.from_hf(hub)
    assert cfg.rope_scaling is None and cfg.mrope_section == (16, 24, 24) and cfg.head_dim == 128
    assert cfg.vision is not None and cfg.vision.out_size == 1536 and cfg.vision.hidden_act == "quick_gelu"
    assert cfg.vision.image_token_id == 151655 and cfg.rope_theta == 1e6 and cfg.tie_word_embeddings


def test_text_only_model_refuses_images(tmp_path):
    from tests.tiny_models import IdTokenizer, make_tiny

    make_tiny("qwen2", tmp_path)
    engine = Engine(EngineConfig(model=str(tmp_path)), tokenizer=IdTokenizer(), num_blocks=8)
    with pytest.raises(InvalidParameter, match="has no vision"):
        engine.encode_chat_images(MESSAGES, [picture(56, 56)])


def test_placeholders_must_match_the_images(vl):
    with pytest.raises(InvalidParameter, match="2 image placeholders for 1 images"):
        vl.engine.encode_chat_images(MESSAGES, [picture(56, 56)])


def test_grpc_ring_matches_one_process(vl):
    """Two stages over real gRPC on loopback: the master runs the tower and the merge, the
    stages get hidden states plus [3, T] positions; greedy tokens equal transformers'."""
    from tests.tiny_vl_ring import vl_ring

    greedy = SamplingParams(temperature=0, max_tokens=DECODE_STEPS + 1, ignore_eos=True)
    with vl_ring(vl.path, NUM_BLOCKS, BLOCK) as engine:
        ids, images = engine.encode_chat_images(MESSAGES, [picture(56, 84, 1), picture(120, 70, 2)])
        seq_id = engine.add_request(ids, greedy, images=images)
        tokens: list[int] = []
        while engine.has_work:
            tokens += [t for o in engine.step() if o.seq_id == seq_id for t in o.token_ids]
    assert tokens == vl.ref.tokens


def test_tokenizer_round_trip(vl):
    tok = load_tokenizer(vl.path)
    assert tok.decode([IMAGE_PAD]) == "<|image_pad|>"


def test_engine_keeps_images_per_request(vl):
    """Two requests with different pictures in one batch each see their own."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
    engine = vl.engine
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    prompts = [engine.encode_chat_images(msgs, [picture(56, 56, s)]) for s in (1, 2)]
    alone = []
    for ids, images in prompts:
        sid = engine.add_request(ids, greedy, images=images)
        out: list[int] = []
        while engine.has_work:
            out += [t for o in engine.step() if o.seq_id == sid for t in o.token_ids]
        alone.append(out)
    sids = [engine.add_request(ids, greedy, images=images) for ids, images in prompts]
    together: dict[int, list[int]] = {s: [] for s in sids}
    while engine.has_work:
        for o in engine.step():
            together[o.seq_id] += o.token_ids
    assert [together[s] for s in sids] == alone
