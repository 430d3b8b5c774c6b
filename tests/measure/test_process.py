"""ProcessCost: the peak memory and the bytes read and written that the optimize report shows."""

from __future__ import annotations

import os

import numpy as np

from slimgraph.measure.process import ProcessCost, count_mapped_read


def test_reads_writes_and_memory_are_counted(tmp_path):
    before = ProcessCost.now()
    data = os.urandom(4_000_000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert path.read_bytes() == data
    count_mapped_read(1_000_000)
    held = np.ones(50_000_000 // 8)  # 50 MB resident
    after = ProcessCost.now()
    assert after.written - before.written >= len(data)
    assert after.read - before.read >= len(data) + 1_000_000
    assert after.peak_rss >= held.nbytes
    assert set(after.to_json()) == {"peak_rss_bytes", "child_peak_rss_bytes", "read_bytes", "written_bytes"}
