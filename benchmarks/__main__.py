"""``python -m profusion_rt.benchmarks``: the same as ``profusion-rt bench``."""

import sys

from profusion_rt.benchmarks.cli import main

sys.exit(main())
