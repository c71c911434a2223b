"""`make demo-describe` (after `make demo`): the inverse task on the same model. Adds a
describing head to the demo model and trains it with every grounding part fixed
(configs/describe_shapes.yaml), checks that the grounding weights came through unchanged, then
describes every test region: K candidates per box by beam search, each grounded back by the
model itself. Reports, for the listener's pick and for the likeliest candidate,
unique-reference accuracy and grammaticality (the shapes generator's own resolver and grammar),
listener accuracy, and BLEU-4 / METEOR / ROUGE-L / CIDEr-D against the test sentences."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CANDIDATES = 5
EXAMPLES = 6  # test images drawn in the picture


def run(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "vglaw.cli", *args])
    if done.returncode:
        raise SystemExit(f"make demo-describe: `vglaw {' '.join(args[:2])}` failed (exit code {done.returncode}); "
                         "see above")


def grounding_check(describing, demo, data: str) -> dict:
    """How the describing model's grounding compares with the demo model it started from:
    "changed", the tensors both hold that differ; "not_carried", the demo model's tensors it
    lacks (the auxiliary category classifier, a training loss's layer, when the describing run
    does not train it); "outputs_equal", whether boxes and mask logits on 8 test images with
    their expressions are equal to the bit."""
    import torch

    from vglaw.data.datamodule import Collate
    from vglaw.data.refer import ReferDataset
    from vglaw.data.transforms import GroundingTransform

    mine, theirs = describing.state_dict(), demo.state_dict()
    changed = [k for k, v in theirs.items() if k in mine and not torch.equal(mine[k], v)]
    not_carried = [k for k in theirs if k not in mine]
    dataset = ReferDataset(data, "shapes", "test", transform=GroundingTransform(demo.img_size))
    batch = Collate(demo.tokenizer_source)([dataset[i] for i in range(8)])
    with torch.no_grad():
        a = describing(batch["images"], batch["input_ids"], batch["attention_mask"])
        b = demo(batch["images"], batch["input_ids"], batch["attention_mask"])
    equal = all(torch.equal(a[k], b[k]) for k in ("boxes", "mask_logits"))
    return {"changed": changed, "not_carried": not_carried, "outputs_equal": equal}


def example_figure(grounder, examples, path: Path) -> None:
    """A grid of test images, each region with the expression chosen for it and its listener IoU."""
    from collections import defaultdict

    from PIL import Image

    from vglaw.inference import prepare_image
    from vglaw.viz.overlay import draw_descriptions

    by_image = defaultdict(list)
    for region, d in examples:
        by_image[region.image_path].append(d)
    tiles = []
    for image_path, described in list(by_image.items())[:EXAMPLES]:
        array, size = prepare_image(image_path)
        tiles.append(draw_descriptions(array, described, size))
    side = max(max(t.size) for t in tiles)
    cols = 3
    rows = (len(tiles) + cols - 1) // cols
    grid = Image.new("RGB", (cols * side, rows * side), (255, 255, 255))
    for k, tile in enumerate(tiles):
        grid.paste(tile, ((k % cols) * side, (k // cols) * side))
    grid.save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vglaw.commands.demo_describe", description=__doc__)
    parser.add_argument("--model", default="outputs/demo/logs/demo/model", help="the `make demo` model folder")
    parser.add_argument("--data", default="data", help="the shapes data `make demo` generated")
    parser.add_argument("--out", default="outputs/demo-describe", help="logs, checkpoints, the model and the report")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    args = parser.parse_args(argv)
    model, out = Path(args.model), Path(args.out)
    if not (model / "config.json").is_file():
        raise SystemExit(f"make demo-describe: no demo model at {model}; run `make demo` first")
    if not (Path(args.data) / "shapes" / "instances.json").is_file():
        raise SystemExit(f"make demo-describe: no shapes data in {args.data}; run `make demo` first")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise SystemExit(f"make demo-describe: {out} holds an earlier run; make demo-describe ARGS=--overwrite "
                         "replaces it")
    if args.overwrite and out.exists():
        import shutil

        shutil.rmtree(out)
    start = time.time()
    print(f"[1/3] training a describing head on {model} (configs/describe_shapes.yaml; grounding fixed)")
    run(["fit", "--config=configs/describe_shapes.yaml", f"--model.init_from={model}",
         f"--data.data_root={args.data}", f"--trainer.default_root_dir={out}",
         f"--trainer.logger.init_args.save_dir={out}", "--trainer.logger.init_args.version=describe"])
    trained = time.time()

    from vglaw.data.refer import ReferDataset
    from vglaw.inference import Grounder
    from vglaw.inference.describe_eval import evaluate_describing, to_markdown
    from vglaw.models.vglaw import VGLAW

    folder = out / "logs" / "describe" / "model"
    grounder = Grounder(folder)
    check = grounding_check(grounder.model, VGLAW.from_pretrained(model), args.data)
    print(f"[2/3] grounding tensors changed by training the describing head: {len(check['changed'])}; "
          f"boxes and mask logits equal to the demo model's to the bit: {check['outputs_equal']}"
          + (f" (not carried: {', '.join(check['not_carried'])}, the auxiliary category classifier)"
             if check["not_carried"] else ""))
    print(f"[3/3] describing every test region ({CANDIDATES} candidates each, each grounded back)")
    result = evaluate_describing(grounder, ReferDataset(args.data, "shapes", "test"), CANDIDATES, keep=40)
    example_figure(grounder, result["examples"], out / "describe_examples.png")
    report = {"regions": result["regions"], "candidates": CANDIDATES, "grounding": check,
              "train_minutes": round((trained - start) / 60, 2), "model": str(folder),
              **{k: result[k] for k in ("reranked", "likeliest")}}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"\nshapes test split, {result['regions']} regions:\n")
    print(to_markdown({k: result[k] for k in ("reranked", "likeliest")}))
    print(f"\nreport {out / 'report.json'}; examples {out / 'describe_examples.png'}; model {folder}")
    print(f"training {(trained - start) / 60:.1f} min; wall time {(time.time() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
