"""Exceptions that the command line turns into one clear line and a non-zero exit."""


class CpalError(Exception):
    """Base class: a user-facing error whose message names the file or key at fault."""


class ConfigError(CpalError):
    """A configuration key or value is invalid."""


class DatasetError(CpalError):
    """A dataset on disk is missing files, malformed, or inconsistent."""


class CheckpointError(CpalError):
    """A checkpoint or weight file cannot be used."""
