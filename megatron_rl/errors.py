"""The project's error types, in one module that imports nothing from the package.

Every room raises these, so that no room imports another just for an exception class
(``config`` and ``rewards`` once imported each other for ``ConfigError``)::

    from megatron_rl.errors import ConfigError, LayoutError

- :class:`ConfigError`: a configuration that cannot run; one line
  ``config error: <field>: <problem>; fix: <fix>``.
- :class:`LayoutError`: an impossible parallel layout (a degree that does not divide a model
  dimension or the world); the message names the config field and the fix.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot run. The message names the field and the fix."""


class LayoutError(ValueError):
    """An impossible parallel layout. The message names the field and the fix."""


def config_error(field_name: str, problem: str, fix: str) -> ConfigError:
    """The one-line :class:`ConfigError` for ``field_name``."""
    return ConfigError(f"config error: {field_name}: {problem}; fix: {fix}")
