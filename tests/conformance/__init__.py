"""Differential conformance suite: unionfs against the kernel's overlayfs.

Random (seeded) lower layers and op sequences run on a kernel overlay and on
unionfs over identical copies; results, merged trees, upper dirs, cross-mounts
and the lowers are compared, divergences are shrunk to a minimal op list.
Modules: layers (generator/builder), ops (vocabulary/executor), snapshot and
compare (observation and diff), worker (per-side child process with
timeouts), mounts, runner, shrink, exclusions (named, documented
differences), cases (hand-written corner cases), cli.
"""
