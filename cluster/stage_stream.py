"""The pipeline's one transport: fire-and-forget sending on a persistent gRPC stream, for
the ring's hop to the next stage (`Stage.Steps`) or to the master (`Master.Results`).

`send()` never waits for the peer: a background reader drains the peer's acks, and the
sender only hears about a step again when it went wrong (an error ack, or the stream
breaking while the step was unacknowledged). The gRPC limits every end of the ring uses
live here too."""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc

from inference.errors import StageFailure
from proto import stage_pb2_grpc

from .tls import NodeTLS, open_channel

log = logging.getLogger(__name__)

# A step's tensors: 4096 tokens x 8192 hidden x 4 bytes is 128 MiB; nothing we send is larger.
MAX_STEP_BYTES = 256 << 20
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_STEP_BYTES + (1 << 20)),
    ("grpc.max_receive_message_length", MAX_STEP_BYTES + (1 << 20)),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
]


class StageError(StageFailure):
    """A stage failed, answered with an error, or did not answer in time."""


_CLOSED = object()
# on_error(step_id, reply_to, message, broken): `broken` is True when the stream failed (the
# peer may be dead, so nobody else will report the step) and False for the peer's error ack.
OnError = Callable[[int, str, str, bool], None]


def _steps(channel: grpc.Channel) -> Callable[..., Iterator]:
    return stage_pb2_grpc.StageStub(channel).Steps


def _results(channel: grpc.Channel) -> Callable[..., Iterator]:
    return stage_pb2_grpc.MasterStub(channel).Results


class StreamSender:
    """Invariant: `_pending` lists, in send order, the (step_id, reply_to) of every message
    on the current stream not yet acknowledged; acks arrive in the same order. When the
    stream fails, each pending step is reported once through `on_error` and the next
    `send()` opens a fresh stream. Thread-safe."""

    def __init__(
        self,
        address: str,
        on_error: OnError,
        kind: str = "steps",
        metadata: Sequence[tuple[str, str]] = (),
        tls: NodeTLS | None = None,
    ):
        """`metadata` goes with every stream this sender opens (the data plane's credentials,
        see cluster.data_auth): once per stream, never per message. `tls`: this node's
        certificate, for a cluster whose gRPC is mutual TLS (None: plaintext)."""
        if kind not in ("steps", "results"):
            raise ValueError(f"unknown stream kind {kind!r}")
        self.address = address
        self.on_error = on_error
        self._metadata = tuple(metadata)
        self._channel = open_channel(address, tls, GRPC_OPTIONS)
        self._call = (_steps if kind == "steps" else _results)(self._channel)
        self._lock = threading.Lock()
        self._requests: queue.Queue | None = None
        self._stream: Any = None  # the grpc streaming call of the current stream, while there is one
        self._pending: deque[tuple[int, str]] = deque()
        self.sent = 0  # messages handed to the stream (a counter for tests and the bench)

    def send(self, msg) -> None:
        """Queue `msg` (a StepRequest or StepResponse) on the stream; returns at once."""
        with self._lock:
            if self._requests is None:
                requests: queue.Queue = queue.Queue()
                self._stream = self._call(iter(requests.get, _CLOSED), metadata=self._metadata)
                self._requests = requests
                threading.Thread(
                    target=self._read, args=(self._stream, requests), name=f"ring-reader-{self.address}", daemon=True
                ).start()
            self._pending.append((msg.step_id, getattr(msg, "reply_to", "")))
            self._requests.put(msg)
            self.sent += 1

    def _read(self, stream, requests: queue.Queue) -> None:
        why = "closed the stream"
        try:
            for ack in stream:
                with self._lock:
                    if self._requests is not requests:
                        return  # dropped on purpose; its steps were already dealt with
                    step_id, reply_to = self._pending.popleft() if self._pending else (None, "")
                if ack.step_id != step_id:
                    why = f"acknowledged step {ack.step_id} for {step_id}"
                    if step_id is not None:
                        with self._lock:
                            self._pending.appendleft((step_id, reply_to))  # report it with the rest
                    break
                if ack.error:
                    self.on_error(ack.step_id, reply_to, f"{self.address}: {ack.error}", False)
        except grpc.RpcError as e:
            why = f"{e.code().name} {e.details()}"
        with self._lock:
            if self._requests is not requests:
                return
            failed = list(self._pending)
            self._drop()
        if failed:
            log.warning("stream to %s failed with %d step(s) unacknowledged: %s", self.address, len(failed), why)
        for step_id, reply_to in failed:
            self.on_error(step_id, reply_to, f"{self.address}: {why}", True)

    def _drop(self) -> None:
        if self._requests is not None:
            self._requests.put(_CLOSED)
            self._stream.cancel()
        self._requests = self._stream = None
        self._pending.clear()

    def reset(self) -> None:
        """Abandon the current stream (e.g. a step timed out); its pending steps are not reported."""
        with self._lock:
            self._drop()

    def close(self) -> None:
        self.reset()
        self._channel.close()
