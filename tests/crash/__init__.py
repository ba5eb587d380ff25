"""Crash consistency: ``kill -9`` of the daemon in the middle of a mixed workload.

``python -m tests.crash --kills N --seed S`` (``make crash``) prints one line per
kill point, every inconsistency with the operation log that leads to it, and a
summary; ``tests/crash/test_crash.py`` runs a short version in the suite.
See :mod:`tests.crash.runner` for what is checked after each kill.
"""
