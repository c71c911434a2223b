"""`make demo` / `make demo-gref`: generate the shapes dataset, train a small VG-LAW from scratch
on the CPU, evaluate it on the test split, ground expressions in a test image, and report where
everything is. `--generalised` does the same for expressions naming zero, one or many shapes."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from vglaw.data.shapes import generate
from vglaw.io.atomic import write_text
from vglaw.io.safe_pickle import load_torch_file, plain_load
from vglaw.training.schedule import cut_short_message, schedule_summary

SINGLE = {"dataset": "shapes", "config": "configs/shapes.yaml", "out": "outputs/demo",
          "curves": ("val/prec@0.5", "val/miou"),
          "report": ("test/prec@0.5", "test/miou", "test/oiou", "test/mask_prec@0.5", "test/mask_prec@0.9")}
GENERALISED = {"dataset": "gshapes", "config": "configs/gshapes.yaml", "out": "outputs/demo-gref",
               "curves": ("val/giou", "val/n_acc", "val/t_acc", "val/grec_prec@f1"),
               "report": ("test/giou", "test/ciou", "test/n_acc", "test/t_acc", "test/pr@0.7", "test/pr@0.8",
                          "test/pr@0.9", "test/grec_prec@f1", "test/grec_prec@f1_iou", "test/grec_n_acc")}


def example_texts(data: Path, generalised: bool) -> tuple[Path, list[str]]:
    """A test image and expressions to ground in it: a relation (single target), or one naming
    several shapes and one naming none (generalised)."""
    if not generalised:
        refs = plain_load(data / "shapes" / "refs(unc).p")
        ref = next(r for r in refs if r["split"] == "test" and r["sentences"][0]["type"] == "relation")
        return data / "images" / "shapes" / ref["file_name"], [ref["sentences"][0]["sent"]]
    refs = json.loads((data / "gshapes" / "grefs(unc).json").read_text())
    test = [r for r in refs if r["split"] == "test"]
    for multi in (r for r in test if len(r["ann_id"]) > 1):
        empty = next((r for r in test if r["image_id"] == multi["image_id"] and r["ann_id"] == [-1]), None)
        if empty:
            texts = [multi["sentences"][0]["sent"], empty["sentences"][0]["sent"]]
            return data / "images" / "gshapes" / multi["file_name"], texts
    raise SystemExit("make demo-gref: no test image with both a multi-target and a no-target expression")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vglaw.commands.demo", description=__doc__)
    parser.add_argument("--data", default="data", help="root folder for the shapes dataset")
    parser.add_argument("--out", default=None, help="folder for logs, checkpoints and pictures "
                        "(default: outputs/demo, or outputs/demo-gref with --generalised)")
    parser.add_argument("--config", default=None, help="default: configs/shapes.yaml (configs/gshapes.yaml)")
    parser.add_argument("--generalised", action="store_true", help="zero, one or many referred shapes (gRefCOCO-style)")
    parser.add_argument("--train", type=int, default=2000, help="training images to generate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo run in --out")
    parser.add_argument("extra", nargs="*", help="further `vglaw fit` overrides, e.g. --trainer.max_epochs=2")
    args, unknown = parser.parse_known_args(argv)  # `vglaw fit` overrides: --trainer.max_epochs=2, ...
    args.extra = [*unknown, *args.extra]
    mode = GENERALISED if args.generalised else SINGLE
    out, data, config = Path(args.out or mode["out"]), Path(args.data), args.config or mode["config"]
    start = time.time()
    earlier = [p for p in (out / "logs" / "demo", out / "logs" / "demo_test") if p.is_dir() and any(p.iterdir())]
    earlier += [p for p in (out / "predict.png", out / "test_metrics.json", out / "learning_curve.png") if p.exists()]
    if earlier and not args.overwrite:
        raise SystemExit(f"make demo: {out} holds an earlier demo run ({earlier[0]}); keep it and write elsewhere "
                         f"(make {'demo-gref OUT_GREF' if args.generalised else 'demo OUT'}=another/folder), or "
                         f"replace it (make {'demo-gref' if args.generalised else 'demo'} ARGS=--overwrite)")
    replace = ["--overwrite"] if args.overwrite else []
    if args.overwrite and (out / "logs" / "demo_test").is_dir():
        import shutil

        shutil.rmtree(out / "logs" / "demo_test")  # the earlier evaluation, whose metrics.csv would be appended to

    if not (data / mode["dataset"] / "instances.json").is_file():
        print(f"[1/4] generating the {mode['dataset']} dataset in {data}/")
        generate(data, args.seed, {"train": args.train, "val": 200, "test": 200}, generalised=args.generalised)
    else:
        print(f"[1/4] using the {mode['dataset']} dataset in {data}/ (delete it to regenerate)")

    common = [f"--data.data_root={data}", f"--trainer.default_root_dir={out}",
              f"--trainer.logger.init_args.save_dir={out}", "--trainer.logger.init_args.version=demo"]
    print(f"[2/4] training a small VG-LAW from scratch on the CPU ({config})")
    run(["fit", f"--config={config}", *common, *replace, *args.extra])
    ckpt = next((out / "logs" / "demo" / "checkpoints").glob("best-*.ckpt"))
    done, planned = schedule_summary(load_torch_file(out / "logs" / "demo" / "checkpoints" / "last.ckpt"))
    model_dir = out / "logs" / "demo" / "model"  # written by `vglaw fit` from the best checkpoint

    print(f"[3/4] evaluating {ckpt} on the test split")
    metrics_file = out / "test_metrics.json"
    run(["test", f"--config={config}", *common, "--trainer.logger.init_args.version=demo_test",
         f"--ckpt_path={ckpt}"])
    from vglaw.viz.plots import line_chart, read_metrics

    test = {k: v[-1][1] for k, v in read_metrics(out / "logs" / "demo_test" / "metrics.csv").items()}
    write_text(metrics_file, json.dumps(test, indent=2))

    print("[4/4] grounding expressions in a test image")
    image, texts = example_texts(data, args.generalised)
    overlay = out / "predict.png"
    run(["predict", "--image", str(image), "--model", str(model_dir), *(a for t in texts for a in ("--text", t)),
         "--out", str(overlay), "--explain", "--json", *replace])

    curves = read_metrics(out / "logs" / "demo" / "metrics.csv")
    curve = line_chart({k: curves[k] for k in mode["curves"] if k in curves}, out / "learning_curve.png",
                       f"{mode['dataset']} validation (per epoch)", y_range=(0, 1))
    print(f"\n{mode['dataset']} test split:")
    for k in mode["report"]:
        if k in test:
            print(f"  {k:<24} {test[k]:.4f}")
    print(f"\ncheckpoint      {ckpt}\nmodel folder    {model_dir}\noverlay         {overlay}\n"
          f"explanation     {overlay.with_name('predict.explain-0.png')}\nlearning curve  {curve}\n"
          f"metrics         {metrics_file}\nwall time       {(time.time() - start) / 60:.1f} min\n\n"
          f"next: vglaw predict --image YOUR.jpg --text '{texts[0]}'   (uses {model_dir})")
    if planned is None:
        print(f"training steps  {done} (the checkpoint records no plan to compare with)")
    elif done < planned:
        print(cut_short_message(done, planned, "a cap or a callback ended `vglaw fit` (see above)")
              + "\n  The README's figures are for the full schedule.", file=sys.stderr)
        return 1
    elif args.extra:
        print(f"training steps  {done} of {done}, with your overrides {' '.join(args.extra)}: not the README's run")
    else:
        print(f"training steps  {done} of {planned}: the whole schedule, as the README's figures")
    return 0


def run(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "vglaw.cli", *args])
    if done.returncode:
        raise SystemExit(f"make demo: `vglaw {args[0]}` failed (exit code {done.returncode}); see above")


if __name__ == "__main__":
    sys.exit(main())
