"""Exceptions that the command line turns into one clear line and a non-zero exit, and
the one-line warning for problems cpal repairs itself but must still report."""


class CpalError(Exception):
    """Base class: a user-facing error whose message names the file or key at fault."""


class ConfigError(CpalError):
    """A configuration key or value is invalid."""


class DatasetError(CpalError):
    """A dataset on disk is missing files, malformed, or inconsistent."""


class CheckpointError(CpalError):
    """A checkpoint or weight file cannot be used."""


class OutputError(CpalError):
    """An output file cannot be written: permissions, a read-only folder, a full disk."""


def warn(message: str) -> None:
    """Log `cpal: warning: MESSAGE` (stderr, above any progress bar): for damage that is
    repaired (a file redone, a fall-back to an older checkpoint), never silently."""
    from cpal.log import get_logger

    get_logger(__name__).warning(message)
