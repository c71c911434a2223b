"""`make demo-finetune` (after `make demo`): your own data, end to end. Writes a small dataset of
a domain the demo model never saw (the shapes in new colours, `vglaw.data.shapes_domain`) as
Label Studio exports, imports it with `vglaw data import`, fine-tunes the demo model on it
(configs/finetune.yaml) and trains the same variant from scratch on it with the same schedule,
then reports the test split for the demo model as it is, fine-tuned, and from scratch. The
from-scratch run gets the whole schedule (no early stopping), at least the fine-tuning's time."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SPLITS = {"train": 40, "val": 13, "test": 26}  # images: ~320 / 115 / 207 expressions
REPORT = ("test/prec@0.5", "test/miou", "test/oiou")


def run(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "vglaw.cli", *args])
    if done.returncode:
        raise SystemExit(f"make demo-finetune: `vglaw {' '.join(args[:2])}` failed (exit code {done.returncode}); "
                         "see above")


def test_metrics(out: Path, version: str, config: list[str], extra: list[str]) -> dict[str, float]:
    """`vglaw test` of the run's model, its metrics read back from its log."""
    from vglaw.viz.plots import read_metrics

    run(["test", *config, f"--trainer.logger.init_args.version={version}", *extra])
    return {k: v[-1][1] for k, v in read_metrics(out / "logs" / version / "metrics.csv").items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vglaw.commands.demo_finetune", description=__doc__)
    parser.add_argument("--model", default="outputs/demo/logs/demo/model", help="the `make demo` model folder")
    parser.add_argument("--data", default="data/finetune", help="where the new domain and its import go")
    parser.add_argument("--out", default="outputs/demo-finetune", help="logs, checkpoints and the report")
    parser.add_argument("--seed", type=int, default=7, help="the new domain's scenes (the demo's are seed 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    args = parser.parse_args(argv)
    model, data, out = Path(args.model), Path(args.data), Path(args.out)
    if not (model / "config.json").is_file():
        raise SystemExit(f"make demo-finetune: no demo model at {model}; run `make demo` first")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise SystemExit(f"make demo-finetune: {out} holds an earlier run; make demo-finetune ARGS=--overwrite "
                         "replaces it")
    if args.overwrite and out.exists():
        import shutil

        shutil.rmtree(out)
    start = time.time()
    source = data / "labelstudio"
    if not (source / "labelstudio_test.json").is_file():
        from vglaw.data.shapes_domain import write_new_domain

        print(f"[1/5] writing the new domain (the shapes in new colours) as Label Studio exports in {source}/")
        write_new_domain(source, args.seed, SPLITS)
    else:
        print(f"[1/5] using the Label Studio exports in {source}/ (delete it to regenerate)")
    print("[2/5] importing them")
    run(["data", "import", "--format", "labelstudio", "--images", str(source / "images"), "--out", str(data),
         "--overwrite", *(a for s in SPLITS for a in ("--input", f"{s}={source / f'labelstudio_{s}.json'}"))])

    config = ["--config=configs/finetune.yaml", f"--data.data_root={data}", f"--trainer.default_root_dir={out}",
              f"--trainer.logger.init_args.save_dir={out}"]
    print(f"[3/5] the demo model as it is ({model}) on the new domain's test split")
    as_is = test_metrics(out, "as_is", [*config, f"--model.init_from={model}"], [])
    rows, times = {"demo model as it is": as_is}, {}
    for k, (name, init) in enumerate((("fine-tuned", str(model)), ("from scratch", "null"))):
        version = "finetuned" if init != "null" else "scratch"
        print(f"[{4 + k}/5] training {name} (configs/finetune.yaml, model.init_from={init})")
        began = time.time()
        whole = ["--trainer.callbacks=[]"] if init == "null" else []  # from scratch: every epoch, no early stop
        run(["fit", *config, f"--model.init_from={init}", f"--trainer.logger.init_args.version={version}", *whole])
        times[name] = (time.time() - began) / 60
        ckpt = next((out / "logs" / version / "checkpoints").glob("best-*.ckpt"))
        rows[name] = test_metrics(out, f"{version}_test", [*config, f"--model.init_from={init}"],
                                  [f"--ckpt_path={ckpt}"])
    report = {name: {k: m.get(k) for k in REPORT} | ({"train_minutes": round(times[name], 2)} if name in times
                                                      else {}) for name, m in rows.items()}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print("\nnew-domain test split (the shapes in new colours):")
    print(f"  {'model':<22} {'Prec@0.5':>9} {'mIoU':>7} {'oIoU':>7} {'train min':>10}")
    for name, m in report.items():
        minutes = f"{m['train_minutes']:.1f}" if "train_minutes" in m else "-"
        print(f"  {name:<22} {m['test/prec@0.5']:>9.4f} {m['test/miou']:>7.4f} {m['test/oiou']:>7.4f} {minutes:>10}")
    print(f"\nreport {out / 'report.json'}\nwall time {(time.time() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
