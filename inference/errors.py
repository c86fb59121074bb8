"""Typed errors raised at the inference package's boundaries.

Callers (the CLI, the HTTP API) turn these into one clear line or an OpenAI error
body; none of them should ever surface as a traceback."""

from __future__ import annotations


class InferenceError(Exception):
    """Base class for every error this package raises on purpose."""


class ModelNotFound(InferenceError):
    """The model source is neither a file, a directory, a known name nor a reachable repo."""


class UnsupportedModel(InferenceError):
    """The checkpoint's architecture (or one of its settings) is not implemented."""


class InvalidParameter(InferenceError, ValueError):
    """A user-supplied value is out of range; `param` names the offending field."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


class CacheFull(InferenceError):
    """The KV block pool cannot hold what was asked of it."""

    def __init__(self, needed: int, free: int, total: int):
        super().__init__(f"KV cache full: needed {needed} blocks, {free} free of {total}")
        self.needed = needed
        self.free = free
        self.total = total


class StageFailure(InferenceError):
    """A pipeline stage failed mid-step (dead, hung or erroring worker): the requests in
    that step cannot continue, but the server can once the stage is replaced."""
