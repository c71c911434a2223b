"""`vglaw predict --pairs --devices N`: the pairs sharded over processes (2 CPU processes under
gloo here) give the single-process output pair for pair, and a killed run resumes."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from vglaw.cli import main


def _pairs(shapes_root, path, repeat=1):
    images = sorted((shapes_root / "images" / "shapes").glob("*.png"))[:6]
    lines = [json.dumps({"image": str(im), "text": t}) for _ in range(repeat) for im in images
             for t in ("the red circle", "the big star", "the square left of the blue circle")]
    lines.insert(3, "not json")
    lines.insert(7, json.dumps({"image": "missing.png", "text": "the red circle"}))
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


def _sharded(pairs, model, output, *extra, **popen):
    cmd = [sys.executable, "-m", "vglaw.cli", "predict", "--pairs", str(pairs), "--model", str(model), "--output",
           str(output), "--devices", "2", "--workers", "0", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _same(a, b):
    """Pair for pair: the same fields and values; boxes to float32 rounding through the batch the
    pair was in (the shards batch pairs differently), at most a 0.01 px rounding step apart."""
    assert [r["line"] for r in a] == [r["line"] for r in b]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if k == "box":
                assert x[k] == pytest.approx(y[k], abs=0.05)
            elif k not in ("mask_rle", "mask_area", "score"):
                assert x[k] == y[k], k
        if "mask_area" in x:
            assert abs(x["mask_area"] - y["mask_area"]) <= 2


def test_sharded_prediction_equals_the_single_process_one_and_resumes(tiny_ckpt, shapes_root, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    n = _pairs(shapes_root, pairs)
    assert main(["predict", "--pairs", str(pairs), "--model", str(tiny_ckpt), "--output",
                 str(tmp_path / "single.jsonl")]) == 0
    single = _records(tmp_path / "single.jsonl")
    assert len(single) == n and sum("error" in r for r in single) == 2

    done = _sharded(pairs, tiny_ckpt, tmp_path / "sharded.jsonl", "--batch-size", "4")
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    _same(single, _records(tmp_path / "sharded.jsonl"))
    assert not (tmp_path / "sharded.jsonl.parts").exists()  # merged, parts removed

    # An earlier run's parts, the last line cut by a crash: those pairs are skipped, the rest done.
    parts = tmp_path / "resumed.jsonl.parts"
    parts.mkdir()
    written = [r for r in _records(tmp_path / "sharded.jsonl") if "error" not in r][:7]
    (parts / "part-0001-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in written) + '{"line": 30, "im')
    done = _sharded(pairs, tiny_ckpt, tmp_path / "resumed.jsonl")
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    assert "resuming from" in err and "(7 of them from an earlier run)" in out
    _same(single, _records(tmp_path / "resumed.jsonl"))


def test_a_killed_sharded_run_resumes_where_it_stopped(tiny_ckpt, shapes_root, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    _pairs(shapes_root, pairs, repeat=12)
    output = tmp_path / "out.jsonl"
    run = _sharded(pairs, tiny_ckpt, output, "--batch-size", "1", start_new_session=True)
    parts = tmp_path / "out.jsonl.parts"
    deadline = time.time() + 240
    while time.time() < deadline and run.poll() is None:
        if any(p.read_text().count("\n") >= 3 for p in parts.glob("part-*.jsonl")):
            break
        time.sleep(0.02)
    os.killpg(run.pid, signal.SIGKILL)  # the whole run: both processes
    run.wait()
    assert not output.exists(), "the run finished before it could be killed"
    kept = sum(p.read_text().count("\n") for p in parts.glob("part-*.jsonl"))
    assert kept >= 3
    done = _sharded(pairs, tiny_ckpt, output)
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    assert "of them from an earlier run" in out
    assert main(["predict", "--pairs", str(pairs), "--model", str(tiny_ckpt), "--output",
                 str(tmp_path / "single.jsonl")]) == 0
    _same(_records(tmp_path / "single.jsonl"), _records(output))
