"""Who may speak on the data plane: a per-plan session secret and the keys derived from it.

The master draws a fresh random secret for every plan (`PlanAuth`). From it come
- one *steps key*, shared by the master and every stage of the plan: it opens `Stage.Steps`
  streams (the master's hop to stage 1 and each stage's hop to the next);
- one *result key per stage*, derived from the secret and the stage's node id: it opens the
  stage's `Master.Results` stream and names the sender, so the master can take a result only
  from the stage its plan says is last (and an error report from any stage of that plan).
A stage receives its two keys (`StageKeys`), never the secret, so it cannot pose as another
stage. Hand-run stages (`python -m cluster.stage_server --secret-file`) derive the same keys
from a secret given to all of them and to their driver.

Every gRPC stream carries `AUTH_HEADER` (and `NODE_HEADER` on result streams) in its
metadata, once per stream: no per-step cost, no extra round trip. The value is an HMAC of
the key (a bearer token, compared in constant time), checked before any message is read.
Without TLS on gRPC (app.py --tls, cluster.tls) someone who can read the LAN's traffic can read
the token as well as the hidden states; what this stops is everyone else — a client of our ports
that never joined. With TLS it stays as a second lock: a certificate proves membership of the
cluster, these keys which plan and which stage."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

AUTH_HEADER = "x-ringllm-auth"  # gRPC metadata keys are lower-case ASCII
NODE_HEADER = "x-ringllm-node"
KEY_BYTES = 32
MIN_SECRET_BYTES = 16
Metadata = tuple[tuple[str, str], ...]


def _mac(key: bytes, *parts: str) -> bytes:
    return hmac.new(key, "\0".join(("ringllm data plane v1", *parts)).encode(), hashlib.sha256).digest()


def _token(key: bytes, purpose: str) -> str:
    return _mac(key, "token", purpose).hex()


class RefusalLog:
    """Warns about refused data-plane calls without letting a flood of them flood the log:
    at most one line per `interval` seconds, saying how many it held back. Thread-safe."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0):
        self.logger = logger
        self.interval = interval
        self._lock = threading.Lock()
        self._last = -interval
        self._held = 0

    def __call__(self, fmt: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last < self.interval:
                self._held += 1
                return
            held, self._held, self._last = self._held, 0, now
        if held:
            self.logger.warning(fmt + " (and %d more refused before it)", *args, held)
        else:
            self.logger.warning(fmt, *args)


def header(metadata: Iterable[tuple[str, str | bytes]] | None, name: str) -> str:
    """The value of `name` in a call's invocation metadata ("" when absent or not text)."""
    for k, v in metadata or ():
        if k == name:
            return v if isinstance(v, str) else ""
    return ""


@dataclass(frozen=True, slots=True)
class StageKeys:
    """What one stage holds for one plan: the plan's steps key and its own result key."""

    steps: bytes
    result: bytes

    def __post_init__(self) -> None:
        if len(self.steps) != KEY_BYTES or len(self.result) != KEY_BYTES:
            raise ValueError(f"data-plane keys are {KEY_BYTES} bytes")

    @classmethod
    def from_secret(cls, secret: bytes, node_id: str) -> StageKeys:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the data-plane secret must have at least {MIN_SECRET_BYTES} bytes")
        return cls(_mac(secret, "steps"), _mac(secret, "result", node_id))

    def steps_metadata(self) -> Metadata:
        return ((AUTH_HEADER, _token(self.steps, "steps")),)

    def results_metadata(self, node_id: str) -> Metadata:
        return ((NODE_HEADER, node_id), (AUTH_HEADER, _token(self.result, "results")))

    def admits_steps(self, token: str) -> bool:
        """Whether a Stage.Steps stream's token is this plan's (constant time)."""
        return hmac.compare_digest(token.encode(), _token(self.steps, "steps").encode())


class PlanAuth:
    """The data-plane credentials of one plan, on the master (or a test driver).
    Invariant: `stages` lists the plan's node ids in ring order (the last one answers the
    master); the secret never leaves this object — stages get `stage_keys(node_id)`."""

    def __init__(self, stages: Sequence[str], secret: bytes | None = None):
        if not stages or len(set(stages)) != len(stages):
            raise ValueError("a plan needs distinct stage ids")
        self.stages = tuple(stages)
        self._secret = secret if secret is not None else secrets.token_bytes(KEY_BYTES)
        self._keys = {node: StageKeys.from_secret(self._secret, node) for node in self.stages}
        self._tokens = {node: _token(k.result, "results").encode() for node, k in self._keys.items()}

    @property
    def last(self) -> str:
        return self.stages[-1]

    def stage_keys(self, node_id: str) -> StageKeys:
        return self._keys[node_id]

    def steps_metadata(self) -> Metadata:
        """What the master's own hop to stage 1 sends: the steps key every stage shares."""
        return self._keys[self.stages[0]].steps_metadata()

    def sender(self, node_id: str, token: str) -> str | None:
        """The stage a Master.Results stream comes from, if its credentials are valid for this plan."""
        want = self._tokens.get(node_id)  # node ids are public; only the token is compared in constant time
        return node_id if want is not None and hmac.compare_digest(token.encode(), want) else None


# ---- carrying a stage's keys in the control channel's Assign ----------------------------
# The control channel is a plain WebSocket: anyone on the path could read an Assign. When a
# join token is set the keys travel XOR-ed with a one-time pad HMAC(token, label, node id,
# nonce), with a fresh random nonce in the same Assign: the token itself never crosses the
# wire (workers prove it by HMAC), so a listener cannot undo the pad, and a pad is never
# reused. (The handshake's nonce would do too, but it lives inside the control code; a nonce
# of our own keeps this self-contained and equally strong.) Without a join token the channel
# admits anyone anyway (loopback, or --insecure), so the keys go as they are.


def _pad(join_token: str, label: str, node_id: str, nonce: str) -> bytes:
    return hmac.new(
        join_token.encode(), "\0".join(("ringllm key wrap v1", label, node_id, nonce)).encode(), hashlib.sha256
    ).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def wrap_keys(keys: StageKeys, node_id: str, join_token: str | None) -> dict[str, Any]:
    """The Assign fields that carry `keys` to `node_id` (see the note above)."""
    if not join_token:
        return dict(key_nonce="", steps_key=keys.steps.hex(), result_key=keys.result.hex(), keys_wrapped=False)
    nonce = secrets.token_hex(16)
    return dict(
        key_nonce=nonce,
        steps_key=_xor(keys.steps, _pad(join_token, "steps", node_id, nonce)).hex(),
        result_key=_xor(keys.result, _pad(join_token, "result", node_id, nonce)).hex(),
        keys_wrapped=True,
    )


def unwrap_keys(
    steps_key: str, result_key: str, key_nonce: str, wrapped: bool, node_id: str, join_token: str | None
) -> StageKeys:
    """A worker's side of `wrap_keys`. ValueError when the Assign has no keys, or they are
    wrapped and this worker has no join token to unwrap them with."""
    if not steps_key or not result_key:
        raise ValueError("the master sent no data-plane keys (is it an older version?)")
    steps, result = bytes.fromhex(steps_key), bytes.fromhex(result_key)
    if wrapped:
        if not join_token:
            raise ValueError("the master wrapped the data-plane keys with a join token; this worker has none")
        steps = _xor(steps, _pad(join_token, "steps", node_id, key_nonce))
        result = _xor(result, _pad(join_token, "result", node_id, key_nonce))
    return StageKeys(steps, result)
