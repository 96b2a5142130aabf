import sys

from profusion_rt.cli import main

sys.exit(main())
