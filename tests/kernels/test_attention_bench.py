"""bench/attention.py: FLOP count as documented, and a clean exit where there is no GPU."""

import pytest
import torch

from flashstep.bench import attention as bench


def test_flops_are_four_b_h_lq_lk_d_and_nasa_counts_both_branches():
    assert bench.Case("self", 8, 8, 4096, 4096, 40).flops() == 4 * 8 * 8 * 4096 * 4096 * 40
    assert bench.Case("cross", 1, 8, 1024, 77, 80).flops() == 4 * 1 * 8 * 1024 * 77 * 80
    assert bench.Case("nasa", 1, 8, 256, 77, 160).flops() == 4 * 1 * 8 * 256 * (77 + 77) * 160


def test_cases_cover_sd15_levels_for_each_kind_and_batch():
    cases = bench.sd15_cases()
    assert {(c.len_q, c.head_dim) for c in cases} == {(4096, 40), (1024, 80), (256, 160)}
    assert {c.kind for c in cases} == {"self", "cross", "nasa"} and {c.batch for c in cases} == {1, 8}
    assert all(c.len_k == 77 for c in cases if c.kind != "self")
    assert len(cases) == 18


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_without_cuda_the_benchmark_says_so_and_exits_zero(capsys, tmp_path):
    out = tmp_path / "attention.json"
    assert bench.main(["--out", str(out)]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert not out.exists()
