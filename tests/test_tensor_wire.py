"""Wire codec: exact round trips, typed errors on malformed input, and a real gRPC stream."""

from __future__ import annotations

import queue
import re
import zlib
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import torch

from cluster.tensor_wire import WireError, decode_step, encode_step, from_proto, to_proto
from proto import stage_pb2, stage_pb2_grpc

MB = 1 << 20


# ---- tensors ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32])
@pytest.mark.parametrize("shape", [(0,), (0, 576), (1,), (3, 5), (7, 576), (2, 3, 4), ()])
@pytest.mark.parametrize("compression", ["", "zlib"])
def test_round_trip_is_exact(dtype, shape, compression):
    g = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        t = (torch.randn(shape, generator=g) * 100).to(dtype)
    else:
        t = torch.randint(-(2**31), 2**31 - 1, shape, generator=g).to(dtype)
    msg = to_proto(t, compression)
    assert msg.compression == compression and list(msg.shape) == list(shape)
    # Through real serialization, as a peer would see it.
    back = from_proto(stage_pb2.Tensor.FromString(msg.SerializeToString()), max_bytes=MB)
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back.view(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))  # bit-exact


def test_round_trip_special_values_and_strides():
    t = torch.tensor([[0.0, -0.0, float("inf")], [float("-inf"), 1e-40, 65504.0]]).t()  # non-contiguous
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = t.to(dtype)
        back = from_proto(to_proto(x), MB)
        assert torch.equal(back.view(torch.uint8), x.contiguous().view(torch.uint8))
    nan = from_proto(to_proto(torch.tensor([float("nan")], dtype=torch.bfloat16)), MB)
    assert nan.isnan().all()


def test_little_endian_layout():
    msg = to_proto(torch.tensor([1, 256], dtype=torch.int32))
    assert msg.data == b"\x01\x00\x00\x00\x00\x01\x00\x00"


def test_unsupported_dtype_and_compression_on_send():
    with pytest.raises(WireError, match="dtype"):
        to_proto(torch.zeros(2, dtype=torch.uint8))
    with pytest.raises(WireError, match="compression"):
        to_proto(torch.zeros(2), "lz4")


def _tensor(dtype="float32", shape=(2, 3), data=None, compression=""):
    data = bytes(24) if data is None else data
    return stage_pb2.Tensor(dtype=dtype, shape=list(shape), data=data, compression=compression)


@pytest.mark.parametrize(
    "msg, match",
    [
        (_tensor(dtype="float64"), "unknown dtype"),
        (_tensor(dtype=""), "unknown dtype"),
        (_tensor(compression="gzip"), "unknown compression"),
        (_tensor(data=bytes(23)), "needs 24 bytes, got 23"),
        (_tensor(data=bytes(25)), "needs 24 bytes, got 25"),
        (_tensor(shape=(-2, -3)), "negative"),
        (_tensor(shape=(1,) * 9, data=bytes(4)), "dimensions"),
        (_tensor(shape=(2**40, 2**40)), "over the limit"),
        (_tensor(shape=(1024, 1024)), "over the limit"),  # 4 MiB declared vs 1 MiB allowed
        (_tensor(data=b"not zlib at all", compression="zlib"), "corrupt zlib"),
        (_tensor(data=zlib.compress(bytes(24))[:-6], compression="zlib"), "truncated"),
        (_tensor(data=zlib.compress(bytes(24)) + b"junk", compression="zlib"), "trailing"),
        (_tensor(data=zlib.compress(bytes(20)), compression="zlib"), "inflates to 20 bytes"),
    ],
)
def test_malformed_tensor_raises_wire_error(msg, match):
    with pytest.raises(WireError, match=match):
        from_proto(msg, max_bytes=MB)


def test_zip_bomb_is_cut_off_at_the_declared_size():
    bomb = zlib.compress(bytes(64 * MB), 9)  # ~64 KiB that inflates to 64 MiB
    # Declared small: the compressed length alone gives it away.
    with pytest.raises(WireError, match="compressed bytes"):
        from_proto(_tensor(shape=(4,), data=bomb, compression="zlib"), max_bytes=MB)
    # Declared just big enough to pass that check: inflation stops at the declared size.
    with pytest.raises(WireError, match="or more"):
        from_proto(_tensor(shape=(len(bomb) // 4,), data=bomb, compression="zlib"), max_bytes=MB)
    # Declared as huge as it really is: refused by max_bytes before inflating.
    with pytest.raises(WireError, match="over the limit"):
        from_proto(_tensor(shape=(16 * MB,), data=bomb, compression="zlib"), max_bytes=MB)


def test_wire_error_is_a_value_error():
    assert issubclass(WireError, ValueError)


# ---- steps -------------------------------------------------------------------------------


def _step_fields(hidden_size=8, block_size=4):
    """Two decodes (ctx 5 and 9), then a prefill of 3 tokens on top of 4 cached (ctx 7)."""
    q_lens, ctx_lens = [1, 1, 3], [5, 9, 7]
    tables = [[3, 1, 0], [2, 5, 6], [4, 7, 0]]
    positions, slots = [], []
    for q, ctx, table in zip(q_lens, ctx_lens, tables):
        for p in range(ctx - q, ctx):
            positions.append(p)
            slots.append(table[p // block_size] * block_size + p % block_size)
    t = sum(q_lens)
    return dict(
        step_id=42,
        hidden=torch.randn(t, hidden_size).to(torch.bfloat16),
        positions=torch.tensor(positions),
        slot_mapping=torch.tensor(slots),
        block_tables=torch.tensor(tables),
        q_lens=q_lens,
        ctx_lens=ctx_lens,
        num_decodes=2,
        block_size=block_size,
    )


@pytest.mark.parametrize("compression", ["", "zlib"])
def test_step_round_trip(compression):
    f = _step_fields()
    msg = encode_step(**f, compression=compression)
    step = decode_step(stage_pb2.StepRequest.FromString(msg.SerializeToString()), max_bytes=MB)
    assert step.step_id == 42 and step.q_lens == f["q_lens"] and step.ctx_lens == f["ctx_lens"]
    assert step.num_decodes == 2 and step.block_size == 4
    for name in ("hidden", "positions", "slot_mapping", "block_tables"):
        assert torch.equal(getattr(step, name), f[name]), name
    meta = step.attention_metadata()
    assert meta.decode_len == 9 and meta.num_decodes == 2 and meta.block_size == 4
    assert meta.decode_mask.shape == (2, 1, 1, 9)
    assert meta.decode_mask[0, 0, 0].tolist() == [True] * 5 + [False] * 4
    assert meta.decode_mask[1].all()


def test_empty_step_round_trips():
    msg = encode_step(
        7,
        torch.zeros(0, 16),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, 1, dtype=torch.long),
        [],
        [],
        0,
        16,
    )
    step = decode_step(msg, MB)
    assert step.hidden.shape == (0, 16) and step.attention_metadata().decode_mask is None


def _mutate(**changes):
    f = _step_fields()
    f.update(changes)
    return f


@pytest.mark.parametrize(
    "fields, match",
    [
        (_mutate(q_lens=[1, 1, 2]), "sum to"),
        (_mutate(q_lens=[1, 1], ctx_lens=[5, 9]), "number of sequences"),
        (_mutate(ctx_lens=[5, 9]), "number of sequences"),
        (_mutate(block_tables=torch.zeros(2, 3, dtype=torch.long)), "number of sequences"),
        (_mutate(q_lens=[1, 1, 3], ctx_lens=[5, 9, 2]), "q_len"),
        (_mutate(q_lens=[1, 0, 4]), "q_len"),
        (_mutate(q_lens=[2, 1, 2]), "q_len 1"),
        (_mutate(num_decodes=4), "num_decodes"),
        (_mutate(num_decodes=-1), "num_decodes"),
        (_mutate(block_size=0), "block_size"),
        (_mutate(ctx_lens=[5, 13, 7]), "blocks"),
        (_mutate(hidden=torch.randn(4, 8)), "hidden rows"),
        (_mutate(hidden=torch.randn(5)), "2-D float"),
        (_mutate(hidden=torch.ones(5, 8, dtype=torch.long)), "2-D float"),
        (_mutate(positions=torch.arange(4)), "positions"),
        (_mutate(positions=torch.arange(5, dtype=torch.int32)), "int64"),
        (_mutate(slot_mapping=torch.arange(6)), "slot_mapping"),
        (_mutate(slot_mapping=torch.tensor([0, 1, -2, 3, 4])), "negative"),
        (_mutate(block_tables=torch.tensor([[3, 1, 0], [2, 5, 6], [4, -7, 0]])), "negative"),
        (_mutate(step_id=-1), "uint64"),
        (_mutate(step_id=2**64), "uint64"),
    ],
)
def test_inconsistent_step_raises_wire_error(fields, match):
    with pytest.raises(WireError, match=match):
        encode_step(**fields)
    # The receiver runs the same checks on a message built behind the encoder's back.
    raw = _raw_request(fields)
    if raw is not None:
        with pytest.raises(WireError):
            decode_step(raw, MB)


def _raw_request(f) -> stage_pb2.StepRequest | None:
    try:
        return stage_pb2.StepRequest(
            step_id=f["step_id"],
            hidden=to_proto(f["hidden"]),
            positions=to_proto(f["positions"]),
            slot_mapping=to_proto(f["slot_mapping"]),
            block_tables=to_proto(f["block_tables"]),
            q_lens=f["q_lens"],
            ctx_lens=f["ctx_lens"],
            num_decodes=f["num_decodes"],
            block_size=f["block_size"],
        )
    except ValueError:  # not even representable in the proto (e.g. a negative uint64)
        return None


def test_step_missing_tensor_ping_and_budget():
    msg = encode_step(**_step_fields())
    msg.ClearField("slot_mapping")
    with pytest.raises(WireError, match="no slot_mapping"):
        decode_step(msg, MB)
    with pytest.raises(WireError, match="ping"):
        decode_step(stage_pb2.StepRequest(step_id=1, ping=True), MB)
    # max_bytes bounds all the step's tensors together: hidden alone fits, the rest do not.
    msg = encode_step(**_step_fields())
    with pytest.raises(WireError, match="over the limit"):
        decode_step(msg, max_bytes=5 * 8 * 2 + 8)


def test_bounds_against_the_stage_cache():
    msg = encode_step(**_step_fields())
    decode_step(msg, MB, num_blocks=8, max_position=9)
    with pytest.raises(WireError, match="block 7 of 7"):
        decode_step(msg, MB, num_blocks=7)
    with pytest.raises(WireError, match="position 8"):
        decode_step(msg, MB, num_blocks=8, max_position=8)
    f = _step_fields()
    f["slot_mapping"] = f["slot_mapping"].clone()
    f["slot_mapping"][0] = 32  # = 8 blocks * 4 slots: one past the end
    with pytest.raises(WireError, match="slot 32 of 32"):
        decode_step(encode_step(**f), MB, num_blocks=8)


def test_no_pickle_on_the_wire():
    root = Path(__file__).resolve().parents[1]
    banned = re.compile(r"import pickle|from pickle|pickle\.|torch\.(load|save)\(")
    for path in [root / "cluster" / "tensor_wire.py", *(root / "proto").glob("*.py")]:
        assert not banned.search(path.read_text()), path


# ---- a real gRPC stream on loopback ------------------------------------------------------

SERVER_LIMIT = 1 * MB  # gRPC message limit on the server, both directions


def _limits(n: int) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", n), ("grpc.max_send_message_length", n)]


class EchoStage(stage_pb2_grpc.StageServicer):
    """A stand-in stage: doubles the hidden states; counts streams to show they persist."""

    def __init__(self) -> None:
        self.streams = 0
        self.steps = 0

    def Steps(self, request_iterator, context):
        self.streams += 1
        for req in request_iterator:
            if req.ping:
                yield stage_pb2.StepResponse(step_id=req.step_id)
                continue
            try:
                step = decode_step(req, max_bytes=SERVER_LIMIT // 4)
            except WireError as e:  # a bad step fails alone; the stream stays usable
                yield stage_pb2.StepResponse(step_id=req.step_id, error=str(e))
                continue
            self.steps += 1
            yield stage_pb2.StepResponse(step_id=step.step_id, hidden=to_proto(step.hidden * 2))

    def Health(self, request, context):
        return stage_pb2.HealthReply(
            node_id="echo",
            start_layer=3,
            end_layer=7,
            ready=True,
            load=self.steps,
            protocol_version=stage_pb2.PROTOCOL_VERSION_CURRENT,
        )


@pytest.fixture
def stage_server():
    servicer = EchoStage()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=_limits(SERVER_LIMIT))
    stage_pb2_grpc.add_StageServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    assert port > 0
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(grace=None)


class Stream:
    """A persistent bidi stream driven one request at a time, like a stage client would."""

    def __init__(self, stub: stage_pb2_grpc.StageStub) -> None:
        self._q: queue.Queue = queue.Queue()
        self._responses = stub.Steps(iter(self._q.get, None), timeout=60)

    def call(self, req: stage_pb2.StepRequest) -> stage_pb2.StepResponse:
        self._q.put(req)
        return next(self._responses)

    def close(self) -> None:
        self._q.put(None)
        assert list(self._responses) == []  # server ends the stream once ours ends


def test_grpc_stream_of_100_steps_and_health(stage_server):
    servicer, addr = stage_server
    with grpc.insecure_channel(addr, options=_limits(8 * MB)) as channel:
        stub = stage_pb2_grpc.StageStub(channel)
        stream = Stream(stub)
        assert stream.call(stage_pb2.StepRequest(step_id=0, ping=True)).step_id == 0
        for i in range(1, 101):
            f = _step_fields(hidden_size=64)
            f["step_id"] = i
            resp = stream.call(encode_step(**f, compression="zlib" if i % 2 else ""))
            assert resp.step_id == i and resp.error == ""
            assert torch.equal(from_proto(resp.hidden, MB), f["hidden"] * 2)
        # An application-level reject (tensor over the stage's max_bytes) answers with an
        # error and leaves the stream working.
        big = encode_step(
            7777,
            torch.zeros(1, SERVER_LIMIT // 8),
            torch.zeros(1, dtype=torch.long),
            torch.zeros(1, dtype=torch.long),
            torch.zeros(1, 1, dtype=torch.long),
            [1],
            [1],
            1,
            16,
        )
        assert "over the limit" in stream.call(big).error
        assert stream.call(stage_pb2.StepRequest(step_id=5, ping=True)).step_id == 5
        stream.close()
        health = stub.Health(stage_pb2.HealthRequest(), timeout=10)
    assert servicer.streams == 1 and servicer.steps == 100
    assert (health.node_id, health.start_layer, health.end_layer, health.ready, health.load) == (
        "echo",
        3,
        7,
        True,
        100,
    )
    assert health.protocol_version == stage_pb2.PROTOCOL_VERSION_CURRENT


def _oversized_step() -> stage_pb2.StepRequest:
    n = 2 * SERVER_LIMIT // 4  # 2 MiB of float32 hidden states
    return encode_step(
        1,
        torch.zeros(1, n),
        torch.zeros(1, dtype=torch.long),
        torch.zeros(1, dtype=torch.long),
        torch.zeros(1, 1, dtype=torch.long),
        [1],
        [1],
        1,
        16,
    )


@pytest.mark.parametrize("client_limit", [SERVER_LIMIT, 8 * MB], ids=["client-refuses", "server-refuses"])
def test_grpc_oversized_message_is_rejected_cleanly(stage_server, client_limit):
    servicer, addr = stage_server
    with grpc.insecure_channel(addr, options=_limits(client_limit)) as channel:
        stub = stage_pb2_grpc.StageStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            Stream(stub).call(_oversized_step())
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The server is unharmed: a fresh stream works.
        stream = Stream(stub)
        assert stream.call(stage_pb2.StepRequest(step_id=9, ping=True)).step_id == 9
        stream.close()
    assert servicer.steps == 0
