import os
import sys

# One compute thread per test process: multi-process tests start several ranks on this 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
