"""Errors a user can cause. The CLI turns each into a one-line message and a non-zero exit."""


class TinydistillError(Exception):
    """Base class: anything the user can fix (bad path, mismatched store, bad option)."""


class TrainError(TinydistillError):
    """A training set-up that cannot run (mismatched store, bad option, missing checkpoint)."""


class Stopped(TinydistillError):
    """A run stopped on request (SIGTERM, SIGINT) after keeping its work; ``signum`` says which."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum  # as a process killed by the signal


class StoreError(TinydistillError):
    """The path is not a usable logit store."""


class NotAStoreError(StoreError):
    """The path does not exist or holds no tinydistill store."""


class UnfinishedStoreError(NotAStoreError):
    """A store whose creation never finished (a full disk or a killed run while creating it)."""


class FormatVersionError(StoreError):
    """The store was written in a format this version cannot read."""


class CorruptStoreError(StoreError):
    """Stored bytes fail their checksum, or a shard recorded complete is missing data."""


class IncompleteError(StoreError):
    """Rows were asked for that no writer has finished yet."""


class UnknownKeyError(StoreError, KeyError):
    """A sample key that is not in the store."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


def one_line(e: BaseException) -> str:
    """``"Type: first line of the message"`` (the type alone when there is no message): how
    an underlying error is quoted inside a one-line message."""
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0]}" if msg and msg[0] else type(e).__name__
