"""Loggers that import ``logging`` only when something is logged.

The modules the mount command runs before its mount is ready log only when
something goes wrong, but ``logging`` (with the ``threading``, ``traceback``
and ``string`` it imports) costs several milliseconds of every mount's start
if it is imported on the way. ``get(name)`` stands for ``logging.getLogger(name)``
and becomes it on first use: the logger's methods are looked up once and then
kept, so a later call costs what a call on the real logger costs.

``before_first_use(hook)`` lets the command arrange where records go (the
daemon holds them until its syslog handler is connected) without importing
``logging`` itself while no logger has been used.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging
    from collections.abc import Callable

_hook: Callable[[], None] | None = None


def before_first_use(hook: Callable[[], None] | None) -> None:
    """Run *hook* just before the first logger of this module is used (None: nothing)."""
    global _hook
    _hook = hook


class _Logger:
    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> object:
        global _hook
        if _hook is not None:
            hook, _hook = _hook, None
            hook()
        import logging

        value = getattr(logging.getLogger(self._name), attr)
        if callable(value):
            self.__dict__[attr] = value  # a bound method of the one logger of that name
        return value


def get(name: str) -> logging.Logger:
    """``logging.getLogger(name)``, with ``logging`` imported at the first call on it."""
    return _Logger(name)  # type: ignore[return-value]
