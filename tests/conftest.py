"""Suite-wide settings.

The suite runs as ``pytest -n 2`` on 2-core machines: one torch thread per test process keeps the two
processes from oversubscribing the cores (tiny models spend most of their time in thread hand-offs
otherwise: a tiny forward+backward measured 0.5 s with 2 threads under load and 4 ms with 1).
"""

import os

import torch

if "EVAMIM_TEST_THREADS" in os.environ:
    torch.set_num_threads(int(os.environ["EVAMIM_TEST_THREADS"]))
else:
    torch.set_num_threads(1)
