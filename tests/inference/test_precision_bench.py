"""The bench's precision section (`vglaw.bench.run.cpu_precision`) on the tiny variant: every
precision timed beside fp32 eager, speed-ups taken round by round, and the section rendered."""
import pytest

pytest.importorskip("onnxruntime")


def test_cpu_precision_section_times_every_precision_against_fp32():
    from vglaw.bench.report import precision_lines
    from vglaw.bench.run import cpu_peak, cpu_precision

    peak = cpu_peak()
    assert peak["peak_gflops"] > 0 and peak["fp32_flops_per_cycle"] in (8, 32, 64)
    section = cpu_precision(("vglaw_tiny",), (1, 2), repeats=2)
    row = section["models"][0]
    assert row["gflops_per_pair"] > 0
    for batch in ("b1", "b2"):
        cells = row[batch]
        assert set(cells) == {"torch_fp32", "torch_bf16", "torch_int8", "ort_fp32", "ort_int8", "fp32_share_of_peak"}
        for key in ("torch_bf16", "torch_int8", "ort_fp32", "ort_int8"):
            values = cells[key]["speedup"]["values"]
            assert len(values) == 2 and all(v > 0 for v in values)
        assert cells["torch_fp32"]["speedup"]["values"] == [1.0, 1.0]
    text = "\n".join(precision_lines(section))
    assert "| vglaw_tiny @ 64 | 1 |" in text and "FLOPs/cycle" in text
