import sys

from nexus_jax.cli import main

sys.exit(main())
