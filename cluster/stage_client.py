"""Master-side (and stage-to-stage) client: one persistent gRPC stream to a stage.

`step()` sends one request and waits for its answer with a timeout, so a dead or hung
stage becomes a `StageError` within `timeout` seconds instead of a hang."""
from __future__ import annotations

import logging
import queue
import threading

import grpc

from inference.errors import StageFailure
from proto import stage_pb2, stage_pb2_grpc

log = logging.getLogger(__name__)

# A step's tensors: 4096 tokens x 8192 hidden x 4 bytes is 128 MiB; nothing we send is larger.
MAX_STEP_BYTES = 256 << 20
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_STEP_BYTES + (1 << 20)),
    ("grpc.max_receive_message_length", MAX_STEP_BYTES + (1 << 20)),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
]
_CLOSED = object()


class StageError(StageFailure):
    """A stage failed, answered with an error, or did not answer in time."""


class StageClient:
    """Invariant: requests and answers pair up in order on one stream; after any failure
    the stream is dropped and the next `step()` opens a fresh one."""

    def __init__(self, address: str, timeout: float = 10.0):
        self.address = address
        self.timeout = timeout
        self._channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
        self._stub = stage_pb2_grpc.StageStub(self._channel)
        self._lock = threading.Lock()
        self._requests: queue.Queue | None = None
        self._answers: queue.Queue | None = None

    def _open(self) -> None:
        requests: queue.Queue = queue.Queue()
        answers: queue.Queue = queue.Queue()
        stream = self._stub.Steps(iter(requests.get, _CLOSED))

        def read() -> None:  # a reader thread turns the blocking iterator into a queue with timeouts
            try:
                for resp in stream:
                    answers.put(resp)
                answers.put(StageError(f"stage {self.address} closed the stream"))
            except grpc.RpcError as e:
                answers.put(StageError(f"stage {self.address}: {e.code().name} {e.details()}"))

        threading.Thread(target=read, name=f"stage-reader-{self.address}", daemon=True).start()
        self._requests, self._answers, self._stream = requests, answers, stream

    def _drop(self) -> None:
        if self._requests is not None:
            self._requests.put(_CLOSED)
            self._stream.cancel()
        self._requests = self._answers = None

    def step(self, req: stage_pb2.StepRequest) -> stage_pb2.StepResponse:
        with self._lock:
            if self._requests is None:
                self._open()
            self._requests.put(req)
            try:
                resp = self._answers.get(timeout=self.timeout)
            except queue.Empty:
                self._drop()
                raise StageError(f"stage {self.address} did not answer step {req.step_id} in {self.timeout:.0f} s") from None
            if isinstance(resp, StageError):
                self._drop()
                raise resp
            if resp.error:
                raise StageError(f"stage {self.address}: {resp.error}")
            if resp.step_id != req.step_id:
                self._drop()
                raise StageError(f"stage {self.address} answered step {resp.step_id} for {req.step_id}")
            return resp

    def health(self) -> stage_pb2.HealthReply:
        try:
            return self._stub.Health(stage_pb2.HealthRequest(), timeout=self.timeout)
        except grpc.RpcError as e:
            raise StageError(f"stage {self.address}: {e.code().name}") from None

    def close(self) -> None:
        with self._lock:
            self._drop()
        self._channel.close()
