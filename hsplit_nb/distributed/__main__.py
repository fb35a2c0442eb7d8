import sys

from .entry import worker_main

sys.exit(worker_main())
