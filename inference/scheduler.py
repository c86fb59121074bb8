"""Continuous batching: which sequences run how many tokens in the next forward pass.

Pure Python (no torch, no I/O, no threads); the engine owns the step loop:

    out = scheduler.schedule()          # blocks for every scheduled token are allocated
    ... forward pass over out.scheduled ...
    scheduler.postprocess(out)          # the scheduled tokens now count as computed
    for s in out.scheduled:
        if s.needs_sample: append the sampled token; scheduler.finish(seq, ...) if it ended

The policy follows vLLM v1: one token budget per step shared by decodes and (chunked)
prefills, running sequences first, then FCFS admission by free KV blocks, and preemption
by recompute when the pool runs out (with the prefix cache, a resumed sequence finds its own
blocks again unless they were evicted meanwhile). Two fairness rules on top, so that one client cannot
hold the server: the sequences of one request (its `n` choices, its prompts: one `group`)
hold at most `max_seqs_per_group` batch slots, and while others wait for a slot a prefill
chunk takes at most half of the step's budget, so a short request queued behind a long
prompt starts at once instead of after its whole prefill."""

from __future__ import annotations

import logging
from collections import Counter, deque
from dataclasses import dataclass, field

from .errors import CacheFull, InvalidParameter
from .kv_cache import KVCacheManager, blocks_for_tokens
from .prefix_cache import Match
from .sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ScheduledSeq:
    """`num_new_tokens` tokens of `seq` to run this step, at positions
    `start .. start + num_new_tokens - 1`.

    `start` and `needs_sample` are fixed when the step is scheduled: `postprocess` and the
    engine's `append_token` change the sequence afterwards, and both must still read the
    decision as it was made."""

    seq: Sequence
    num_new_tokens: int
    start: int = field(init=False)
    # True when this step computes the sequence's last token: the engine samples for it.
    needs_sample: bool = field(init=False)

    def __post_init__(self) -> None:
        self.start = self.seq.num_computed_tokens
        if not 1 <= self.num_new_tokens <= self.seq.num_uncomputed_tokens:
            raise ValueError(
                f"seq {self.seq.seq_id}: {self.num_new_tokens} new tokens, {self.seq.num_uncomputed_tokens} uncomputed"
            )
        self.needs_sample = self.start + self.num_new_tokens == self.seq.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    """One step's decision. `scheduled` is in batch order (running ones first, then newly
    admitted ones); `preempted` lost their blocks and wait again; `finished` were ended by
    the scheduler itself (reason "length": the whole pool cannot hold their next token)."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Waiting queue (FCFS deque) and running list (admission order) over one KV pool.

    Invariants:
    - every live sequence is in exactly one of `waiting` (status WAITING, no blocks,
      `num_computed_tokens == 0`) or `running` (status RUNNING); finished ones are in neither;
    - only running sequences hold KV blocks, so freeing every running sequence leaves the pool
      free or cached (the prefix tree's blocks stay until evicted);
    - `len(running) <= max_batch`, and no step schedules more than `max_batch_tokens` tokens;
    - `running` is ordered by admission, so its tail is the preemption victim;
    - no group ever holds more than `max_seqs_per_group` running sequences (preemption only
      removes sequences, admission checks the cap).
    """

    def __init__(
        self, kv: KVCacheManager, max_batch: int, max_batch_tokens: int, max_seqs_per_group: int | None = None
    ):
        """`max_seqs_per_group`: batch slots one request may hold; None means half the batch
        (at least one), which leaves the other half to later requests."""
        if max_batch < 1:
            raise InvalidParameter("max_batch", "must be >= 1")
        if max_batch_tokens < 1:
            raise InvalidParameter("max_batch_tokens", "must be >= 1")
        if max_seqs_per_group is not None and max_seqs_per_group < 1:
            raise InvalidParameter("max_seqs_per_group", "must be >= 1")
        self.kv = kv
        self.max_batch = max_batch
        self.max_batch_tokens = max_batch_tokens
        self.max_seqs_per_group = max_seqs_per_group or max(1, max_batch // 2)
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._live: dict[int, Sequence] = {}  # seq_id -> waiting or running sequence

    # -- views ---------------------------------------------------------------------------
    @property
    def waiting(self) -> tuple[Sequence, ...]:
        return tuple(self._waiting)

    @property
    def running(self) -> tuple[Sequence, ...]:
        return tuple(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    # -- requests in and out -------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Enqueue a new sequence; raises CacheFull if its prompt exceeds the whole pool."""
        if seq.status is not SequenceStatus.WAITING or seq.block_table or seq.num_computed_tokens:
            raise ValueError(f"seq {seq.seq_id} is not a fresh waiting sequence")
        if seq.seq_id in self._live:
            raise ValueError(f"seq {seq.seq_id} was already added")
        needed = blocks_for_tokens(seq.num_prompt_tokens, self.kv.block_size)
        if needed > self.kv.pool.num_blocks:
            raise CacheFull(needed, self.kv.num_free_blocks, self.kv.pool.num_blocks)
        self._waiting.append(seq)
        self._live[seq.seq_id] = seq

    def abort(self, seq_id: int) -> Sequence | None:
        """End a waiting or running sequence now (its blocks return to the pool at once)."""
        seq = self._live.get(seq_id)
        if seq is None:
            return None
        self._end(seq, "abort")
        return seq

    def finish(self, seq: Sequence, reason: str) -> None:
        """The engine ends a sequence (eos, stop, length); a no-op if it already ended."""
        if seq.seq_id in self._live:
            self._end(seq, reason)

    def requeue_running(self) -> None:
        """Put every running sequence back at the front of the queue, in admission order,
        with its blocks freed: the runner lost their KV (a stage died), and they start over
        (prompt + output, as after a preemption) once a new runner is in place. The cached
        prefixes went with that KV, so the tree is emptied too."""
        while self._running:
            self._preempt_last()
        if dropped := self.kv.reset_prefix_cache():
            logger.info("prefix cache cleared: %d blocks of KV were lost with the runner", dropped)

    def _end(self, seq: Sequence, reason: str) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self._running.remove(seq)
        else:
            self._waiting.remove(seq)
        del self._live[seq.seq_id]
        self.kv.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    # -- one step ------------------------------------------------------------------------
    def schedule(self, admit: bool = True) -> SchedulerOutput:
        """Decide this step and allocate the KV blocks of every scheduled token. With
        `admit=False` only running sequences advance (the engine drains them while it
        cannot serve new ones)."""
        out = SchedulerOutput()
        budget = self.max_batch_tokens
        held = Counter(s.group for s in self._running if s.group is not None)
        # Whether a waiting sequence could take a slot this step: then a prefill shares.
        others_wait = (
            admit
            and len(self._running) < self.max_batch
            and any(s.group is None or held[s.group] < self.max_seqs_per_group for s in self._waiting)
        )

        # Running sequences first, in admission order: a decode takes one token, a sequence
        # in chunked prefill its next chunk, but never the token of a decode behind it: the
        # streams keep flowing while a long prompt fills in. Victims come off the tail, which
        # this loop has not reached yet, so a scheduled sequence is never preempted in the
        # same step.
        decodes_left = sum(s.num_uncomputed_tokens == 1 for s in self._running)
        i = 0
        while i < len(self._running) and budget > 0:
            seq = self._running[i]
            if self._exceeds_pool(seq):
                self._end(seq, "length")
                out.finished.append(seq)
                continue
            if seq.num_uncomputed_tokens == 1:
                decodes_left -= 1
            n = self._chunk(seq.num_uncomputed_tokens, budget - decodes_left, others_wait)
            if n <= 0:  # nothing to compute (no token appended yet), or no room left for a chunk
                i += 1
                continue
            target = seq.num_computed_tokens + n
            while not self.kv.can_allocate(seq, target):
                victim = self._preempt_last()
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # it preempted itself: it was the tail, nothing runs after it
            self.kv.allocate(seq, target)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
            i += 1

        # After a preemption the pool is known to be short, so nothing is admitted.
        if admit and not out.preempted:
            self._admit(out, budget, held)
        return out

    def _admit(self, out: SchedulerOutput, budget: int, held: Counter[int]) -> None:
        """Admit waiting sequences FCFS: when one does not fit in the pool, nothing behind it
        jumps ahead (a long prompt is never starved by a stream of short ones). A sequence
        whose group holds its share of slots is passed over, not waited for: it starts when
        one of its siblings finishes, and the requests behind it start now. With the prefix
        cache, a sequence starts from its longest cached prefix, which costs neither budget
        nor new blocks, and one whose next blocks another sequence is computing right now
        waits for them (the `n` choices of a request, or users arriving together behind one
        system prompt, compute the shared prompt once instead of each computing it)."""
        for seq in list(self._waiting):
            if budget <= 0 or len(self._running) >= self.max_batch:
                return
            if self._exceeds_pool(seq):
                self._end(seq, "length")
                out.finished.append(seq)
                continue
            if seq.group is not None and held[seq.group] >= self.max_seqs_per_group:
                continue
            match = self.kv.match(seq)
            if self.kv.tree is not None and self._prefix_in_flight(seq, match):
                continue
            hit = len(match.nodes) * self.kv.block_size
            others_wait = len(self._waiting) > 1 and len(self._running) + 1 < self.max_batch
            n = self._chunk(seq.num_tokens - hit, budget, others_wait)
            if not self.kv.can_allocate(seq, hit + n, match):
                return
            self._waiting.remove(seq)
            self.kv.adopt(seq, match)
            self.kv.allocate(seq, hit + n)
            seq.status = SequenceStatus.RUNNING
            self._running.append(seq)
            if seq.group is not None:
                held[seq.group] += 1
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n

    def _prefix_in_flight(self, seq: Sequence, match: Match) -> bool:
        """A running sequence is computing the block `seq` needs right after its cached prefix
        `match` (same tokens after the same prefix): once it has, `seq` finds that block,
        and maybe more, in the cache instead of computing it a second time."""
        bs, m = self.kv.block_size, len(match.nodes)
        if (m + 1) * bs > seq.num_tokens - 1:  # no further block of `seq` could come from the cache
            return False
        want = seq.cache_slice(m * bs, (m + 1) * bs)
        end = match.nodes[-1] if match.nodes else None
        return any(
            s.num_computed_tokens // bs == m
            and s.num_prompt_tokens >= (m + 1) * bs
            and self.kv.cached_path_end(s) is end
            and s.cache_slice(m * bs, (m + 1) * bs) == want
            for s in self._running
        )

    def _chunk(self, uncomputed: int, budget: int, others_wait: bool) -> int:
        """Tokens to compute this step of a sequence with `uncomputed` left. While others
        could start, a prefill chunk leaves them half of the step (a decode is one token anyway)."""
        n = min(uncomputed, budget)
        if n > 1 and others_wait:
            n = min(n, max(1, self.max_batch_tokens // 2))
        return n

    def postprocess(self, out: SchedulerOutput) -> None:
        """Count this step's tokens as computed. Sequences aborted while the forward pass
        ran are skipped: their blocks, and with them their KV, are already gone."""
        for s in out.scheduled:
            if s.seq.status is SequenceStatus.RUNNING:
                s.seq.num_computed_tokens += s.num_new_tokens
                self.kv.cache_computed(s.seq)

    def _exceeds_pool(self, seq: Sequence) -> bool:
        # Computing all of its tokens would need more than every block of the pool, so it
        # can never sample again: ending it is the only way not to deadlock on it.
        return seq.num_tokens > self.kv.capacity_tokens

    def _preempt_last(self) -> Sequence:
        """Recompute preemption of the most recently admitted running sequence: drop its KV
        and put it at the front of the queue; it re-prefills prompt + output on resume."""
        seq = self._running.pop()
        self.kv.free(seq)  # also resets num_computed_tokens
        seq.status = SequenceStatus.WAITING
        self._waiting.appendleft(seq)
        logger.info(
            "preempted seq %d (%d tokens) for lack of KV blocks; %d running, %d waiting",
            seq.seq_id,
            seq.num_tokens,
            len(self._running),
            len(self._waiting),
        )
        return seq
