"""`make demo`: generate the shapes dataset, train the small VG-LAW on the CPU, evaluate it on
the test split, ground an expression in a test image, and report where everything is."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from vglaw.atomic import write_text
from vglaw.data.shapes import generate
from vglaw.safe_pickle import plain_load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vglaw.demo", description=__doc__)
    parser.add_argument("--data", default="data", help="root folder for the shapes dataset")
    parser.add_argument("--out", default="outputs/demo", help="folder for logs, checkpoints and pictures")
    parser.add_argument("--config", default="configs/shapes.yaml")
    parser.add_argument("--train", type=int, default=2000, help="training images to generate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("extra", nargs="*", help="further `vglaw fit` overrides, e.g. --trainer.max_epochs=2")
    args = parser.parse_args(argv)
    out, data = Path(args.out), Path(args.data)
    start = time.time()

    if not (data / "shapes" / "instances.json").is_file():
        print(f"[1/4] generating the shapes dataset in {data}/")
        generate(data, args.seed, {"train": args.train, "val": 200, "test": 200})
    else:
        print(f"[1/4] using the shapes dataset in {data}/ (delete it to regenerate)")

    common = [f"--data.data_root={data}", f"--trainer.default_root_dir={out}",
              f"--trainer.logger.init_args.save_dir={out}", "--trainer.logger.init_args.version=demo"]
    print("[2/4] training vglaw_small on the CPU")
    run(["fit", f"--config={args.config}", *common, *args.extra])
    ckpt = next((out / "logs" / "demo" / "checkpoints").glob("best-*.ckpt"))
    model_dir = out / "logs" / "demo" / "model"  # written by `vglaw fit` from the best checkpoint

    print(f"[3/4] evaluating {ckpt} on the test split")
    metrics_file = out / "test_metrics.json"
    run(["test", f"--config={args.config}", *common, "--trainer.logger.init_args.version=demo_test",
         f"--ckpt_path={ckpt}"])
    test_csv = out / "logs" / "demo_test" / "metrics.csv"
    from vglaw.plots import line_chart, read_metrics

    test = {k: v[-1][1] for k, v in read_metrics(test_csv).items()}
    write_text(metrics_file, json.dumps(test, indent=2))

    print("[4/4] grounding an expression in a test image")
    refs = plain_load(data / "shapes" / "refs(unc).p")
    ref = next(r for r in refs if r["split"] == "test" and r["sentences"][0]["type"] == "relation")
    image = data / "images" / "shapes" / ref["file_name"]
    overlay = out / "predict.png"
    run(["predict", "--image", str(image), "--model", str(model_dir), "--text", ref["sentences"][0]["sent"],
         "--out", str(overlay), "--explain", "--json"])

    curves = read_metrics(out / "logs" / "demo" / "metrics.csv")
    curve = line_chart({k: curves[k] for k in ("val/prec@0.5", "val/miou") if k in curves},
                       out / "learning_curve.png", "shapes validation (per epoch)", y_range=(0, 1))
    print("\nshapes test split:")
    for k in ("test/prec@0.5", "test/miou", "test/oiou", "test/mask_prec@0.5", "test/mask_prec@0.9"):
        if k in test:
            print(f"  {k:<20} {test[k]:.4f}")
    print(f"\ncheckpoint      {ckpt}\nmodel folder    {model_dir}\noverlay         {overlay}\n"
          f"explanation     {overlay.with_name('predict.explain-0.png')}\nlearning curve  {curve}\n"
          f"metrics         {metrics_file}\nwall time       {(time.time() - start) / 60:.1f} min\n\n"
          f"next: vglaw predict --image YOUR.jpg --text \"the red circle\"   (uses {model_dir})")
    return 0


def run(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "vglaw.cli", *args])
    if done.returncode:
        raise SystemExit(f"make demo: `vglaw {args[0]}` failed (exit code {done.returncode}); see above")


if __name__ == "__main__":
    sys.exit(main())
