"""The cost table the strategies decide with: every kernel measured, never cheaper for more tokens, cached."""

import pytest
import torch

from sortedllm.inference import Runtime
from sortedllm.inference.costs import SIZES, _monotone, cost_table


def test_monotone_keeps_the_fastest_timing_and_never_falls_with_n():
    table = _monotone({1: [3.0, 1.0, 2.0], 2: [0.9, 5.0], 4: [1.5, 1.4]})
    assert table == {1: 1.0, 2: 1.0, 4: 1.4}


@pytest.mark.parametrize("arch_name", ["llama"], indirect=True)
def test_cost_table_is_measured_once_and_monotone(tiny_sorted, tmp_path, monkeypatch):
    monkeypatch.setenv("SORTEDLLM_CACHE", str(tmp_path))
    rt = Runtime.of(tiny_sorted, "float32")
    ids = torch.arange(64)
    table = cost_table(rt, ids)
    for kind in (table.layer, table.head, table.subset_head):
        assert sorted(kind) == list(SIZES) and all(v > 0 for v in kind.values())
        assert all(kind[a] <= kind[b] for a, b in zip(SIZES, SIZES[1:]))
    assert table.subset_rows == 64 and table.step(6, 4) >= table.step(6, 1)
    assert list((tmp_path / "costs").glob("*.json"))  # on disk for the next process
    rt.__dict__.pop("_costs")
    assert cost_table(rt, ids) == table  # read back, not measured again
