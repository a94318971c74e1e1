"""The project's exception types: errors a user can cause, each with a message naming the fix."""


class DisDistError(Exception):
    """Base class of every error a user can cause (config, data, paths, environment)."""


class ConfigError(DisDistError, ValueError):
    """A configuration key, value or combination is invalid."""


class DataError(DisDistError):
    """Input data is missing, unreadable or inconsistent."""


class CheckpointError(DisDistError):
    """A checkpoint is missing, incomplete or does not match the run."""


class CheckpointMismatch(CheckpointError):
    """A checkpoint belongs to another model or data than the run that would resume it."""


class RunDirError(DisDistError):
    """The run directory cannot be used: another job holds it, or it cannot be written."""


class BackendError(DisDistError, RuntimeError):
    """A requested compute backend cannot run here."""


class TrainingError(DisDistError, RuntimeError):
    """Training cannot go on as configured (for example, the loss keeps being non-finite)."""
