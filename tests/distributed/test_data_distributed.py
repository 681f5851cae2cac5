"""The data pipeline under torchrun (2 CPU ranks, gloo)."""
import os

import numpy as np

from megatron_minitron.data import write_indexed_dataset
from procs import torchrun

HERE = os.path.dirname(os.path.abspath(__file__))


def test_datasets_loader_and_calibration_on_two_ranks(tmp_path):
    for name, n_docs, seed in (("a", 50, 0), ("b", 30, 1)):
        rng = np.random.RandomState(seed)
        docs = [list(rng.randint(2, 300, size=rng.randint(5, 40))) for _ in range(n_docs)]
        write_indexed_dataset(str(tmp_path / name), docs, 1, 300)
    out = torchrun(os.path.join(HERE, "data_worker.py"), 2, str(tmp_path))
    assert "DATA_WORKER_OK" in out
