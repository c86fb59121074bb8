"""Master side of one worker's control connection: its state (`WorkerConn`), and the errors
a command to it (assign, wait for ready, drain) can end in."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from starlette.websockets import WebSocket

from .control_messages import Assign, Capacity, Holding, Ready
from .heartbeat import PingTracker
from .registry import NodeState


class ControlError(RuntimeError):
    """A worker could not do what the master asked. `node_id` names it."""

    def __init__(self, node_id: str, message: str):
        super().__init__(message)
        self.node_id = node_id


class WorkerLost(ControlError):
    """The worker disconnected, went silent, or was drained before answering."""


class LoadFailed(ControlError):
    """The worker answered `failed` to an assign."""


class LoadTimeout(ControlError):
    """The worker did not report ready within the caller's timeout (it may still be loading)."""


@dataclass(slots=True, eq=False)
class WorkerConn:
    """One registered worker connection. Invariant: while it is the current connection for
    its node_id, `state` equals the state of that node in the registry; `closed` is set once,
    when the socket is gone, and a closed connection never becomes current again."""

    node_id: str
    grpc_address: str
    capacity: Capacity
    holding: Holding | None  # what the worker held when it registered; updated when it reports ready
    peer: str
    ws: WebSocket = field(repr=False)
    last_seen: float  # time.monotonic() of the last message from the worker
    state: NodeState = NodeState.JOINING
    plan_id: int | None = None  # the assign being loaded or served
    assigned: Assign | None = None
    ready: Ready | None = None
    closed: bool = False
    outcome: asyncio.Future | None = field(default=None, repr=False)  # Ready, or an exception, for plan_id
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    pings: PingTracker = field(default_factory=PingTracker, repr=False)  # our heartbeats, and the RTT
    # The master address this worker's control connection reached: an address the worker can
    # route to, so the ring's last stage can send results back to it (see --advertise-host).
    master_host: str | None = None


def settle(fut: asyncio.Future | None, result: Ready | None = None, error: Exception | None = None) -> None:
    if fut is None or fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
