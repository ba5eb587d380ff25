"""Entry point: ``python -m tests.conformance --cases N --seed S`` (see cli.py)."""

import sys

from tests.conformance.cli import main

sys.exit(main())
