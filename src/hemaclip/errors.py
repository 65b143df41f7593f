"""Errors a user can act on. The CLI prints their message as one line and exits non-zero."""


class HemaclipError(Exception):
    """Base class for errors caused by input the user supplied (files, options, checkpoints)."""


class DataError(HemaclipError):
    """A data file, folder or CSV is missing, corrupt or does not match what was expected."""


class CheckpointError(HemaclipError):
    """A checkpoint is missing, corrupt, or from an incompatible hemaclip version or config."""
