"""The library's exceptions: configuration errors are ``ValueError`` subclasses."""

from __future__ import annotations


class InspectError(Exception):
    """Base class of every exception raised by lightning-inspect."""


class ConfigError(InspectError, ValueError):
    """A bad argument or configuration value, raised before training starts."""


class SelectionError(ConfigError):
    """A module pattern matched nothing (the message lists the closest module names)."""


class BackendError(ConfigError):
    """A requested logging backend has no matching logger attached to the Trainer."""


class NonFiniteError(InspectError):
    """A NaN or Inf was found and the monitor was configured with ``on_nonfinite="raise"``."""
