"""`python -m ift_jax` is the `ift-jax` command."""

import sys

from ift_jax.cli import main

sys.exit(main())
