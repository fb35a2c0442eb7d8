# Notebooks collected by nbmake run in quick mode (tiny model, few steps); their kernels inherit this.
import os

os.environ.setdefault("HSPLIT_QUICK", "1")
