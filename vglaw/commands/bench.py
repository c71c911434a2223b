"""`vglaw bench`: parameters, FLOPs, latency, throughput and memory (see `vglaw.bench.run`)."""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from vglaw.errors import UsageError
from vglaw.io.atomic import check_output, write_text


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vglaw bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (< 2 min on 2 cores)")
    parser.add_argument("--out", default=None, help="folder for results.json and results.md (default: bench, the "
                        "committed record; with --quick outputs/bench-quick)")
    parser.add_argument("--overwrite", action="store_true", help="replace results.json / results.md that exist")
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "vglaw-bench-shapes"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    args.out = args.out or ("outputs/bench-quick" if args.quick else "bench")
    check_output(Path(args.out), kind="dir", overwrite=True)  # the folder may exist; its two files are checked
    for name in ("results.json", "results.md"):  # before minutes of work
        check_output(Path(args.out) / name, overwrite=args.overwrite)
    # the library (torch) loads once the arguments are read: --help answers without it
    from vglaw.bench.report import to_markdown
    from vglaw.bench.run import run_all

    start = time.time()
    report = run_all(args.quick, args.data, args.threads)
    report["wall_s"] = time.time() - start
    out = Path(args.out)
    write_text(out / "results.json", json.dumps(report, indent=2))
    md = to_markdown(report)
    write_text(out / "results.md", md + "\n")
    print(md)
    print(f"\nwrote {out / 'results.json'} and {out / 'results.md'} in {report['wall_s']:.0f} s")
    return 0
