"""The one error root of the package.

Every error ``stlink`` raises on purpose derives from :class:`StlinkError`; the CLI turns each into
one line ``stlink <command>: error: <message>`` and an exit code (see ``stlink.cli``), never a
traceback.  The message names the file, column, sensor, timestamp or parameter at fault.

    StlinkError
      ConfigError      params that do not fit the schema or each other (also ValueError)
      DataError        bad input data or an unusable file (also ValueError)
      ResourceError    the machine refused: disk full, read-only or missing folder, a lock held
"""
from __future__ import annotations


class StlinkError(Exception):
    """Root of every error the package raises on purpose (one line for the CLI)."""


class ConfigError(StlinkError, ValueError):
    """A params file or override that does not fit the schema."""


class DataError(StlinkError, ValueError):
    """Bad input data.  The message names the file, column, sensor or timestamp."""


class ResourceError(StlinkError, OSError):
    """An operating-system resource failed: no space left, a read-only or missing folder, a busy lock.

    ``ResourceError(errno.EACCES, "message")``; ``str()`` is the message alone."""

    def __str__(self) -> str:
        return self.strerror if self.strerror else super().__str__()
