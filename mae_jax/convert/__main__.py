"""`python -m mae_jax.convert export|import ...` (see `mae_jax.convert.cli`)."""

import sys

from mae_jax.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
