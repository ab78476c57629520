"""The one error type of checkpointing that reaches users (a one-line message, no traceback)."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or trusted: ``<what> <where>: <why>``."""
