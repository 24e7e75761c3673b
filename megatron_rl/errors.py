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

from typing import Optional


class ConfigError(ValueError):
    """A configuration that cannot run. The message names the field and the fix."""


class LayoutError(ValueError):
    """An impossible parallel layout. The message names the field and the fix.

    A layout rule that a config field can break also carries ``field``, ``problem`` and ``fix``,
    so that config validation, which calls the layout builders instead of restating their rules,
    turns it into its one line (:func:`config_error_from`)::

        raise LayoutError.of("rollout.tp", f"{tp} does not divide num_attention_heads={heads}",
                             "choose another rollout.tp")    # "rollout.tp=6 does not divide ..."
    """

    def __init__(self, message: str, *, field: Optional[str] = None, problem: Optional[str] = None,
                 fix: Optional[str] = None):
        super().__init__(message)
        self.field = field
        # A subclass (models.RopeError) may have set problem and fix before calling us.
        self.problem = problem if problem is not None else getattr(self, "problem", None)
        self.fix = fix if fix is not None else getattr(self, "fix", None)

    @classmethod
    def of(cls, field: str, problem: str, fix: str) -> "LayoutError":
        """``<field>=<problem>; fix: <fix>``, where ``problem`` starts with the field's value."""
        return cls(f"{field}={problem}; fix: {fix}", field=field, problem=problem, fix=fix)


def config_error(field_name: str, problem: str, fix: str) -> ConfigError:
    """The one-line :class:`ConfigError` for ``field_name``."""
    return ConfigError(f"config error: {field_name}: {problem}; fix: {fix}")


def config_error_from(err: LayoutError, *, field_name: str, fix: str) -> ConfigError:
    """A layout rule's failure as one config line; ``field_name``/``fix`` serve an error without parts."""
    if err.field is None:
        return config_error(field_name, str(err).split("; fix: ")[0], fix)
    return config_error(err.field, err.problem, err.fix)
