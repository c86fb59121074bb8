"""Control-channel messages: the JSON a master and its workers exchange over /ws/worker.

Every message is one JSON object with a `type` (the discriminator) and `v`, the protocol
version. `parse()` is the only way in: it checks the size first, then the JSON, then the
version, then the schema, so a peer's bytes never reach our code unvalidated and every
refusal carries a short reason that is safe to log (no input values are echoed: a
malformed message could be huge or carry a secret).

Exchange (master ← worker):  challenge → register → registered | refused, then
heartbeat/heartbeat_ack both ways, assign → ready | failed, status, drain. With `--tls` the
challenge says so, the register carries the worker's certificate request and the registered
its certificate and the CA's (cluster.tls)."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

PROTOCOL_VERSION: Final = 1  # Final: mypy reads it as Literal[1], the type of every message's `v`
MAX_MESSAGE_BYTES = 64 * 1024
# WebSocket close codes: policy violation (bad token, bad message), message too big, try later.
CLOSE_POLICY, CLOSE_TOO_BIG, CLOSE_TRY_LATER = 1008, 1009, 1013

# Bounds on what a peer may claim. Generous for real hardware, small enough that no field
# can be used to make the other side allocate or log megabytes.
_MAX_BYTES = 1 << 60  # memory figures (an exbibyte)
_MAX_INT = 1 << 53  # counters, sequence numbers, plan ids (exact in every JSON reader)
_MAX_LAYERS = 100_000
MAX_CSR_BYTES = 4096  # an EC P-256 certificate request is ~350 bytes, an RSA-4096 one ~1.7 KB
MAX_CERT_BYTES = 8192
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9_.-]{1,253}):([0-9]{1,5})$")

NodeId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:@-]+$")]
Reason = Annotated[str, Field(max_length=2048)]
ModelName = Annotated[str, Field(max_length=1024)]
DType = Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_]+$")]
Bytes = Annotated[int, Field(ge=0, le=_MAX_BYTES)]
Count = Annotated[int, Field(ge=0, le=_MAX_INT)]
Layer = Annotated[int, Field(ge=0, le=_MAX_LAYERS)]
Seconds = Annotated[float, Field(ge=0, le=1e9)]
Hex64 = Annotated[str, Field(max_length=64, pattern=r"^([0-9a-f]{64})?$")]  # an HMAC-SHA256, or "" for none
# PEM blocks: base64 lines between the BEGIN/END lines of their kind, nothing else.
_B64_LINES = r"(?:[A-Za-z0-9+/=]{1,76}\r?\n)+"
CsrPem = Annotated[
    str,
    Field(
        max_length=MAX_CSR_BYTES,
        pattern=rf"^-----BEGIN CERTIFICATE REQUEST-----\r?\n{_B64_LINES}-----END CERTIFICATE REQUEST-----\r?\n?$",
    ),
]
CertPem = Annotated[
    str,
    Field(
        max_length=MAX_CERT_BYTES,
        pattern=rf"^-----BEGIN CERTIFICATE-----\r?\n{_B64_LINES}-----END CERTIFICATE-----\r?\n?$",
    ),
]


class ProtocolError(ValueError):
    """A message was refused. `reason` is short, names no secret and is safe to send back;
    `close_code` is the WebSocket close code that fits (1009 too big, 1008 otherwise)."""

    def __init__(self, reason: str, close_code: int = 1008):
        super().__init__(reason)
        self.reason = reason
        self.close_code = close_code


def check_host_port(v: str) -> str:
    m = _HOST_PORT.match(v)
    if m is None or not 0 < int(m.group(2)) < 65536:
        raise ValueError("must be host:port with a port in 1..65535")
    return v


def auth_digest(join_token: str, nonce: str, node_id: str, csr: str | None = None) -> str:
    """What a worker sends instead of the token: HMAC-SHA256(token, nonce + node_id), hex; with
    a certificate request, its SHA-256 is covered too, so nobody on the path can swap in their
    own key and have the master sign it under this worker's proof."""
    msg = nonce + node_id
    if csr is not None:
        msg += "\0csr:" + hashlib.sha256(csr.encode()).hexdigest()
    return hmac.new(join_token.encode(), msg.encode(), hashlib.sha256).hexdigest()


def tls_proof(join_token: str, nonce: str, node_id: str, ca: str, cert: str) -> str:
    """What the master adds to Registered when it has a join token: HMAC-SHA256(token, nonce,
    node id, the CA's and the certificate's SHA-256), hex. The worker checks it, so someone on
    the plain WebSocket path who lacks the token cannot slip it a CA of their own."""
    ca_hash, cert_hash = (hashlib.sha256(x.encode()).hexdigest() for x in (ca, cert))
    msg = "\0".join(("ringllm tls v1", nonce, node_id, ca_hash, cert_hash))
    return hmac.new(join_token.encode(), msg.encode(), hashlib.sha256).hexdigest()


class _Base(BaseModel):
    # strict: no "1" for 1, no true for 1; forbid: a typo'd or injected field is an error,
    # not silently dropped; frozen: a parsed message is a value, nobody edits it in place.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)
    v: Literal[1] = PROTOCOL_VERSION


class Capacity(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)
    device: Annotated[str, Field(min_length=1, max_length=64)]
    total_bytes: Bytes
    free_bytes: Bytes
    matmul_gflops: Annotated[float, Field(ge=0, le=1e9)]  # a quick measured matmul, for the planner
    backend: Literal["torch", "mlx"] = "torch"  # what runs the worker's layers (shown on the Nodes tab)
    # The worker's --layers override for the planner: a layer count, or a [start, end) range.
    layers: (
        Annotated[int, Field(ge=0, le=_MAX_LAYERS)] | Annotated[list[Layer], Field(min_length=2, max_length=2)] | None
    ) = None

    @model_validator(mode="after")
    def _free_le_total(self):
        if self.free_bytes > self.total_bytes:
            raise ValueError("free_bytes exceeds total_bytes")
        return self


class Shard(BaseModel):
    """A non-empty range [start, end) of a model with `num_layers` decoder layers, and the KV
    pool a stage keeps for it: what a master assigns and what a worker then holds."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)
    model: ModelName
    start: Layer
    end: Layer
    num_layers: Annotated[int, Field(ge=1, le=_MAX_LAYERS)]
    num_blocks: Annotated[int, Field(ge=1, le=_MAX_INT)]
    block_size: Annotated[int, Field(ge=1, le=1 << 16)]
    dtype: DType
    # How the stage holds its weights: none, int8 or int4 (the master resolves "auto" first).
    quant: Annotated[str, Field(pattern=r"^(none|int8|int4)$")] = "none"

    @model_validator(mode="after")
    def _span(self) -> Shard:
        if not self.start < self.end <= self.num_layers:
            raise ValueError("need 0 <= start < end <= num_layers")
        return self

    def shard(self) -> dict[str, Any]:
        """This message's shard fields, to build another Shard message from."""
        return {name: getattr(self, name) for name in Shard.model_fields}


class Holding(Shard):
    """What a worker already has loaded, sent on (re)register so a restarted master can adopt it."""

    loads: Count  # how many shards this worker process has loaded so far


class Challenge(_Base):
    type: Literal["challenge"] = "challenge"
    nonce: Annotated[str, Field(min_length=32, max_length=128, pattern=r"^[0-9a-f]+$")]
    tls: bool = False  # the master serves gRPC with mutual TLS: send a certificate request


class Register(_Base):
    type: Literal["register"] = "register"
    node_id: NodeId
    grpc_address: Annotated[str, Field(max_length=300)]
    capacity: Capacity
    holding: Holding | None = None
    # hex HMAC-SHA256(join_token, nonce + node_id [+ the CSR's hash]); "" when the worker has no token.
    auth: Hex64 = ""
    csr: CsrPem | None = None  # the worker's certificate request, when the challenge said tls

    _addr = field_validator("grpc_address")(check_host_port)


class Registered(_Base):
    type: Literal["registered"] = "registered"
    node_id: NodeId
    heartbeat_interval: Annotated[float, Field(gt=0, le=3600)]
    heartbeat_timeout: Annotated[float, Field(gt=0, le=86400)]
    # With --tls: the worker's certificate, the CA's, and (with a join token) tls_proof over both.
    tls_cert: CertPem | None = None
    tls_ca: CertPem | None = None
    tls_proof: Hex64 = ""

    @model_validator(mode="after")
    def _tls_pair(self) -> Registered:
        if (self.tls_cert is None) != (self.tls_ca is None):
            raise ValueError("tls_cert and tls_ca come together")
        return self


class Refused(_Base):
    type: Literal["refused"] = "refused"
    reason: Reason


class Assign(_Base, Shard):
    type: Literal["assign"] = "assign"
    plan_id: Count
    next_hop: Annotated[str, Field(max_length=300)] | None = None  # None: the last stage answers the master
    # The plan's data-plane keys for this stage (cluster.data_auth), hex; XOR-wrapped with a
    # pad from the join token and `key_nonce` when `keys_wrapped`. Empty: no keys (the
    # worker then refuses the assignment: its gRPC server would admit nobody).
    steps_key: Annotated[str, Field(pattern=r"^([0-9a-f]{64})?$")] = ""
    result_key: Annotated[str, Field(pattern=r"^([0-9a-f]{64})?$")] = ""
    key_nonce: Annotated[str, Field(max_length=64, pattern=r"^[0-9a-f]*$")] = ""
    keys_wrapped: bool = False
    # The plan's budget per step (cluster.step_limits); None: the stage's defaults.
    max_seqs: Annotated[int, Field(ge=1, le=1 << 20)] | None = None
    max_tokens: Annotated[int, Field(ge=1, le=1 << 24)] | None = None
    max_context_tokens: Annotated[int, Field(ge=1, le=_MAX_INT)] | None = None

    @field_validator("next_hop")
    @classmethod
    def _hop(cls, v: str | None) -> str | None:
        return None if v is None else check_host_port(v)


class Ready(_Base):
    type: Literal["ready"] = "ready"
    plan_id: Count
    load_seconds: Seconds
    mem_used_bytes: Bytes
    mem_free_bytes: Bytes
    loads: Count


class Failed(_Base):
    type: Literal["failed"] = "failed"
    plan_id: Count
    reason: Reason


class Heartbeat(_Base):
    type: Literal["heartbeat"] = "heartbeat"
    seq: Count
    sent_at: Annotated[float, Field(ge=0, le=1e12)]  # the sender's monotonic clock; only it reads this


class HeartbeatAck(_Base):
    type: Literal["heartbeat_ack"] = "heartbeat_ack"
    seq: Count


class Status(_Base):
    type: Literal["status"] = "status"
    state: Literal["idle", "loading", "ready"]
    in_flight: Count
    steps_done: Count
    mem_used_bytes: Bytes
    mem_free_bytes: Bytes


class Drain(_Base):
    type: Literal["drain"] = "drain"
    reason: Reason


Message = Annotated[
    Challenge | Register | Registered | Refused | Assign | Ready | Failed | Heartbeat | HeartbeatAck | Status | Drain,
    Field(discriminator="type"),
]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(Message)
MESSAGE_TYPES = frozenset(
    t.model_fields["type"].default
    for t in (Challenge, Register, Registered, Refused, Assign, Ready, Failed, Heartbeat, HeartbeatAck, Status, Drain)
)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _short(v: object, limit: int = 40) -> str:
    s = repr(v)
    return s if len(s) <= limit else s[:limit] + "…"


def _reason(e: ValidationError) -> str:
    parts = []
    for err in e.errors(include_url=False, include_input=False)[:3]:
        loc = ".".join(str(x) for x in err["loc"][1:]) or "message"  # [0] is the type tag
        parts.append(f"{loc}: {err['msg']}")
    more = e.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


def parse(raw: str | bytes) -> Message:
    """Validate one frame from a peer: size, then JSON, then version, then schema.
    Raises ProtocolError (never anything else) with a reason fit to send back."""
    if not isinstance(raw, (str, bytes, bytearray)):
        raise ProtocolError(f"expected a text frame, got {type(raw).__name__}")
    size = len(raw) if isinstance(raw, (bytes, bytearray)) else len(raw.encode("utf-8", "surrogatepass"))
    if size > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {size} bytes exceeds the limit of {MAX_MESSAGE_BYTES}", 1009)
    try:
        obj = json.loads(raw, parse_constant=_no_constants)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ProtocolError(f"malformed JSON: {_short(str(e), 120)}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"expected a JSON object, got {type(obj).__name__}")
    v = obj.get("v")
    if type(v) is not int:
        raise ProtocolError("missing or non-integer protocol version 'v'")
    if v != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {_short(v)} is not supported (this side speaks {PROTOCOL_VERSION})")
    kind = obj.get("type")
    if kind not in MESSAGE_TYPES:
        raise ProtocolError(f"unknown message type {_short(kind)}")
    try:
        return _ADAPTER.validate_python(obj)
    except ValidationError as e:
        raise ProtocolError(f"invalid {kind}: {_reason(e)}") from None


def dump(msg: BaseModel) -> str:
    """Serialize one of our own messages; refuses to produce a frame the peer would refuse."""
    text = msg.model_dump_json()
    if len(text.encode()) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"{type(msg).__name__} of {len(text)} bytes exceeds the limit of {MAX_MESSAGE_BYTES}", 1009)
    return text
