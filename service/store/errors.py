"""The store's errors; each message is for people and says what to do."""

from __future__ import annotations


class StoreError(Exception):
    """Base of the store's errors; the message is for people."""


class JobNotFound(StoreError):
    def __init__(self, job_id: str):
        self.job_id = job_id
        super().__init__(f"no job {job_id!r}")


class TransitionRefused(StoreError):
    """The job is not in a state the requested change can leave from (e.g. it already ended)."""


class BadCursor(StoreError):
    pass


class QueueFull(StoreError):
    """A submit over a queued-jobs cap (the user's or everyone's)."""


class UserExists(StoreError):
    pass


class UserNotFound(StoreError):
    pass
