"""fastdeit's own exception types, and how the entry points report them.

A ``FastDeitError`` is a failure we anticipated, whose message already says what is wrong and
where (the config key, the file, the folder): a configuration mistake, a data folder or file
list that doesn't fit, weights that can't be read or don't fit, a checkpoint that is missing or
belongs to another run, a launch that doesn't fit the machine. The entry points under ``launch/`` print it as one line,
``fastdeit: error: <message>``, and exit with status 2 (fastdeit.cli.reported); under a launcher
only rank 0 prints (every rank meets the same mistake), except for errors only one rank can meet
(an image file of its shard that doesn't decode). This module imports nothing of the library, so
every module may raise these. Anything else is a bug or an environment failure and keeps
its full traceback.

Each type also derives from the built-in exception the code raised before (ValueError,
RuntimeError, ...), so callers catching those keep working.
"""
from __future__ import annotations


class FastDeitError(Exception):
    """An anticipated failure with a complete message; printed as one line by the entry points."""

    every_rank = True    # under a launcher every rank meets it alike: rank 0 alone reports it

    def __init__(self, *args, every_rank: bool = None):
        super().__init__(*args)
        if every_rank is not None:
            self.every_rank = every_rank


class ConfigError(FastDeitError, ValueError):
    """A configuration problem; the message names the key and, where known, the file."""


class DataError(FastDeitError, ValueError):
    """A data folder, file list or exclusion list that can't be used; names the path."""


class BadImageError(FastDeitError, RuntimeError):
    """An image file that does not decode, met by one rank in its shard mid-run."""

    every_rank = False


class WeightsError(FastDeitError, ValueError):
    """A weights file or URL that is missing, can't be read safely, or holds no usable state_dict."""


class CheckpointMismatchError(FastDeitError, RuntimeError):
    """Weights or a checkpoint that do not fit the model they are loaded into (names the file and the keys)."""


class CheckpointError(FastDeitError, RuntimeError):
    """A run checkpoint or run folder that is missing, incomplete, or in the way."""


class LaunchError(FastDeitError, RuntimeError):
    """A launch that doesn't fit the machine: the accelerator DeepSpeed chose, GPUs per rank."""


class RunExistsError(CheckpointError, FileExistsError):
    """A fresh run asked for in a folder that already holds one."""


def one_line(error: BaseException) -> str:
    """The message on one line (some wrap a library's multi-line message)."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())
