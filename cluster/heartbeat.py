"""Heartbeat round-trip bookkeeping, shared by both ends of the control channel.

Each side numbers the heartbeats it sends and measures the RTT when the peer acks one;
`control.ControlServer` keeps one tracker per worker connection, `control_client.ControlClient`
one per worker. Pure: no I/O and no clock reads; callers pass time.monotonic() values in."""

from __future__ import annotations

MAX_PENDING = 32  # unanswered heartbeats remembered for RTT; older ones are forgotten


class PingTracker:
    """Heartbeat sequence numbers and the last measured RTT.

    Invariant: `pending` maps seq -> send time for at most `max_pending` unanswered
    heartbeats, every seq in it is in 1..`seq` (the last one handed out), and an ack is
    counted at most once (it removes its entry). `rtt_ms` is None until the first ack of a
    remembered heartbeat, then the round trip of the latest such ack, in milliseconds.
    Acks of unknown or forgotten seqs are ignored: a peer may echo anything."""

    __slots__ = ("max_pending", "pending", "seq", "rtt_ms")

    def __init__(self, max_pending: int = MAX_PENDING):
        if max_pending < 1:
            raise ValueError("max_pending must be >= 1")
        self.max_pending = max_pending
        self.pending: dict[int, float] = {}
        self.seq = 0
        self.rtt_ms: float | None = None

    def sent(self, now: float) -> int:
        """Record a heartbeat sent at `now`; returns its seq (1, 2, ...)."""
        self.seq += 1
        self.pending[self.seq] = now
        if len(self.pending) > self.max_pending:
            del self.pending[min(self.pending)]
        return self.seq

    def acked(self, seq: int, now: float) -> None:
        """The peer acked heartbeat `seq` at `now`: update `rtt_ms` if we remember it."""
        sent = self.pending.pop(seq, None)
        if sent is not None:
            self.rtt_ms = (now - sent) * 1000

    def restart(self) -> None:
        """A new connection: forget unanswered heartbeats (nobody will ack them) and number
        from 1 again. `rtt_ms` keeps the last measurement until a new one replaces it."""
        self.pending.clear()
        self.seq = 0
