"""``python -m conversion ...`` (same as ``nexus-jax convert ...``)."""

import sys

from conversion.cli import main

sys.exit(main())
