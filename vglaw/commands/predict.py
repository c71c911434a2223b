"""`vglaw predict`: ground expressions in one image, or many image-expression pairs in batches.

    vglaw predict --image x.jpg --text "left dog" [--text ...] [--model DIR|HUB_ID|CKPT] [--explain]
    vglaw predict --pairs pairs.jsonl [--output predictions.jsonl] [--overlays DIR]
                  [--format jsonl|labelstudio|coco]
    vglaw predict --images FOLDER --texts expressions.txt [--output predictions.jsonl]
    vglaw predict --pairs BIG.jsonl --devices N [--num-nodes M] [--workers W]   (sharded, resumable)

With no --model, the most recent model folder `make demo`, `vglaw fit` or `vglaw export` wrote.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from vglaw.commands import PRECISION_HELP, PRECISIONS
from vglaw.errors import MissingFileError, OutputError, UsageError
from vglaw.io.atomic import atomic_write, check_output, free_name, save_image, slug

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def read_pairs(args) -> tuple[list[tuple[int, object, str]], list[tuple[int, str]]]:
    """(line or index, image, text) pairs and (line, problem) for unusable lines."""
    pairs, bad = [], []
    if args.pairs:
        path = Path(args.pairs)
        if not path.is_file():
            raise MissingFileError(f"--pairs file not found: {path}")
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as err:
                    bad.append((n, f"{path}:{n}: not JSON ({err.msg})"))
                    continue
                if not isinstance(item, dict) or not isinstance(item.get("image"), str) or \
                        not isinstance(item.get("text"), str):
                    bad.append((n, f"{path}:{n}: needs string fields 'image' and 'text'"))
                    continue
                image = Path(item["image"]).expanduser()
                pairs.append((n, image if image.is_absolute() else path.parent / image, item["text"]))
    else:
        folder, texts_file = Path(args.images), Path(args.texts or "")
        if not folder.is_dir():
            raise MissingFileError(f"--images folder not found: {folder}")
        if not texts_file.is_file():
            raise MissingFileError(f"--texts file not found: {texts_file} (one expression per line)")
        texts = [t.strip() for t in texts_file.read_text(encoding="utf-8").splitlines() if t.strip()]
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not images or not texts:
            raise UsageError(f"nothing to do: {len(images)} images in {folder}, "
                             f"{len(texts)} expressions in {texts_file}")
        pairs = [(k, image, text) for k, (image, text) in enumerate(((i, t) for i in images for t in texts), 1)]
    return pairs, bad


def batch_output(args) -> Path:
    """Where batch results go, checked: --output (an existing one only with --overwrite), or
    the first free `<pairs>.predictions[-N].jsonl`; never the pairs or texts file it reads."""
    source = Path(args.pairs or args.images)
    inputs = [source] + ([Path(args.texts)] if args.texts else [])
    if args.output:
        return check_output(Path(args.output), inputs, flag="--output", overwrite=args.overwrite)
    suffix = ".predictions.jsonl" if args.format == "jsonl" else f".predictions.{args.format}.json"
    return check_output(free_name(source.with_suffix("").as_posix() + suffix), inputs, flag="--output")


def overlay_paths(args, pairs) -> dict[int, Path]:
    """--overlays: the picture of each pair by line, checked before any work (an existing one
    only with --overwrite)."""
    if not args.overlays:
        return {}
    # the folder may exist, and hold the inputs: each picture has a name of its own, checked below
    folder = check_output(Path(args.overlays), kind="dir", flag="--overlays", overwrite=True)
    paths = {n: folder / f"{slug(image)}-{n}.png" for n, image, _ in pairs}
    existing = [p for p in paths.values() if p.exists()]
    if existing and not args.overwrite:
        raise UsageError(f"--overlays {folder} already holds {len(existing)} of this run's pictures (e.g. "
                         f"{existing[0].name}); add --overwrite to replace them, or give another folder")
    return paths


def single_outputs(args) -> tuple[Path, list[Path]]:
    """The overlay and (with --explain) the explanation figures of `--image`, checked before any
    work: named ones exist only with --overwrite; with no --out, the first free default name."""
    explain = lambda out: [out.with_name(f"{out.stem}.explain-{k}.png") for k in range(len(args.text))]  # noqa: E731
    if args.out:
        out = check_output(Path(args.out), [Path(args.image)], kind="image", overwrite=args.overwrite)
        figures = explain(out) if args.explain else []
        for figure in figures:
            check_output(figure, [Path(args.image)], kind="image", flag="--explain", overwrite=args.overwrite)
    else:
        base, k = Path("outputs/predict") / slug(args.image), 1
        out = base.with_name(base.name + ".png")  # the slug may hold dots: not a suffix
        while any(p.exists() for p in [out, *explain(out)]):  # a name of its own, figures included
            k += 1
            out = base.with_name(f"{base.name}-{k}.png")
        out = check_output(out, [Path(args.image)], kind="image")
        figures = explain(out) if args.explain else []
    if args.json_out:
        check_output(Path(args.json_out), [Path(args.image)], flag="--json-out",
                     outputs={"--out": out, **{f"--explain figure {k}": f for k, f in enumerate(figures)}},
                     overwrite=args.overwrite)
    return out, figures


def predict_many(args, grounder, pairs: list, bad: list, output: Path, overlays: dict[int, Path]) -> int:
    from tqdm import tqdm

    from vglaw.inference.exchange import ExchangeWriter
    from vglaw.inference.results import PairError
    from vglaw.viz.overlay import draw_overlay

    for n, problem in bad:
        print(f"vglaw predict: skipped line {n}: {problem}", file=sys.stderr)
    # per run, so two runs writing the same --output never share (and mix) one partial file
    partial = output.with_name(f"{output.name}.{os.getpid()}.partial")
    done = skipped = 0
    records: dict[int, dict] = {n: {"line": n, "error": p} for n, p in bad}
    exchange = ExchangeWriter(args.format, str(grounder.model.source or "vglaw")) if args.format != "jsonl" else None
    try:
        with open(partial, "w") as out:
            results = grounder.predict_pairs(((image, text) for _, image, text in pairs), args.batch_size,
                                             keep_image=bool(overlays))
            for (n, image, text), r in tqdm(zip(pairs, results), total=len(pairs), desc="predict", unit="pair"):
                record = {"line": n, "image": str(image), "text": text}
                if isinstance(r, PairError):
                    skipped += 1
                    record["error"] = r.error
                    where = "line" if args.pairs else "pair"
                    print(f"vglaw predict: skipped {where} {n}: {r.error}", file=sys.stderr)
                else:
                    done += 1
                    record.update({"height": r.size[0], "width": r.size[1], "box_format": "xyxy", **r.to_json()})
                    if overlays:
                        record["overlay"] = str(save_image(draw_overlay(r.image, [r]), overlays[n]))
                        r.image = None  # drawn: the next image may replace it
                    if exchange is not None:
                        exchange.add(str(image), r)
                records[n] = record
                while exchange is None and records and min(records) <= n:  # the input's order, bad lines too
                    out.write(json.dumps(records.pop(min(records))) + "\n")
            if exchange is None:
                for n in sorted(records):
                    out.write(json.dumps(records.pop(n)) + "\n")
            else:
                json.dump(exchange.content(), out)
        os.replace(partial, output)
    except OSError as err:  # a full disk or a vanished folder: say where the results so far are
        kept = f"; the results so far are in {partial}" if partial.is_file() else ""
        raise OutputError(f"could not write {output}: {err.strerror or err}{kept}") from err
    print(f"{done} pairs grounded, {skipped + len(bad)} skipped; results in {output}")
    return 0 if done or not (pairs or bad) else 2


def predict_sharded_command(args, pairs: list, bad: list, output: Path) -> int:
    from vglaw.inference import Grounder, resolve_model
    from vglaw.inference.sharded import parts_folder, predict_sharded

    folder = parts_folder(output)
    if folder.is_dir():
        print(f"vglaw predict: resuming from {folder} (the pairs already written there are skipped)", file=sys.stderr)
    grounder = Grounder(resolve_model(args.model), "cpu", precision=args.precision)  # Lightning places it
    summary = predict_sharded(grounder, [(n, image, text) for n, image, text in pairs], bad, output, args.devices,
                              args.num_nodes, args.batch_size, args.workers)
    if summary is None:  # another process than the first: it wrote its parts
        return 0
    resumed = f" ({summary['resumed']} of them from an earlier run)" if summary["resumed"] else ""
    print(f"{summary['grounded']} pairs grounded, {summary['skipped']} skipped{resumed}; results in {output}")
    return 0 if summary["grounded"] or not (pairs or bad) else 2


def predict_one(args, grounder, out: Path, figures: list[Path]) -> int:
    from vglaw.inference import prepare_image
    from vglaw.viz.explain import explain_figure
    from vglaw.viz.overlay import draw_overlay

    array, size = prepare_image(args.image)
    results = grounder.predict_decoded(array, size, args.text, return_attention=args.explain)
    save_image(draw_overlay(array, results), out)
    if args.explain:
        figures = [str(explain_figure(array, r, figure, grounder.img_size)) for r, figure in zip(results, figures)]
    report = {"image": str(args.image), "height": size[0], "width": size[1], "box_format": "xyxy",
              "model": str(grounder.model.source or ""), "results": [r.to_json() for r in results],
              "overlay": str(out), **({"explain": figures} if figures else {})}
    if args.json_out:
        with atomic_write(args.json_out, "w") as f:
            json.dump(report, f, indent=2)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for r in results:
            if r.no_target:
                print(f"{r.text!r}: no target (existence score {r.exists:.2f})")
            elif r.generalised:
                print(f"{r.text!r}: {len(r.boxes)} boxes (existence score {r.exists:.2f}): " +
                      ", ".join(f"{b} score={s}" for b, s in zip(r.boxes, r.box_scores)))
            else:
                print(f"{r.text!r}: box={r.box} score={r.score}")
        print(f"overlay written to {out}" + (f"; explanations: {', '.join(figures)}" if figures else ""))
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vglaw predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", help="image file (EXIF orientation is honoured)")
    parser.add_argument("--text", action="append", help="referring expression; repeat for more")
    parser.add_argument("--pairs", help="JSONL file, one {\"image\": path, \"text\": expression} per line")
    parser.add_argument("--images", help="folder of images, each grounded with every line of --texts")
    parser.add_argument("--texts", help="file of expressions, one per line (with --images)")
    parser.add_argument("--model", "--ckpt", dest="model", default=None,
                        help="model folder, hub id, training .ckpt or .onnx (default: the latest written here)")
    parser.add_argument("--out", default=None, help="overlay PNG (default: outputs/predict/<image>-<hash>[-N].png, "
                        "a new name when one exists)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    parser.add_argument("--json-out", default=None, help="also write the JSON to this file")
    parser.add_argument("--explain", action="store_true", help="per expression, a PNG of the block x word "
                        "language weights, the pooling map, mask and box")
    parser.add_argument("--output", default=None,
                        help="batch mode: results JSONL (default: <input>.predictions.jsonl, or -2, -3, ... when "
                        "that exists)")
    parser.add_argument("--format", default="jsonl", choices=("jsonl", "labelstudio", "coco"),
                        help="batch mode: --output as JSONL (one result per line), Label Studio pre-annotations "
                        "(import as predictions) or COCO results JSON")
    parser.add_argument("--overlays", default=None,
                        help="batch mode: also write an overlay per pair to this folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace outputs named by --out, --json-out, --output or in --overlays that exist")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--devices", default=None,
                        help="batch mode: shard the pairs over this many processes per node (GPUs, or CPU "
                        "processes) with Lightning's trainer.predict; resumable, merged in the input order")
    parser.add_argument("--num-nodes", type=int, default=1, help="with --devices: nodes (e.g. under srun / torchrun)")
    parser.add_argument("--workers", type=int, default=2,
                        help="with --devices: DataLoader workers per process that decode the images")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when present)")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS, help=PRECISION_HELP)
    args = parser.parse_args(argv)
    batch = bool(args.pairs or args.images)
    if batch == bool(args.image) or (args.image and not args.text) or (args.pairs and args.images):
        raise UsageError("give --image with --text, or --pairs FILE, or --images FOLDER with --texts FILE")
    if args.format != "jsonl" and not batch:
        raise UsageError("--format applies to batch mode (--pairs or --images); --json gives one image's results")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.devices is not None:
        if not batch:
            raise UsageError("--devices shards batch mode (--pairs or --images); one image runs in one process")
        if args.format != "jsonl" or args.overlays:
            raise UsageError("--devices writes JSON lines (--format jsonl) without --overlays")
        if args.device is not None:
            raise UsageError("give --device (one process) or --devices (Lightning places the processes), not both")
        if not (args.devices.isdigit() and int(args.devices) >= 1) and args.devices not in ("auto", "-1"):
            raise UsageError(f"--devices {args.devices}: a number of processes per node, or auto")
        if args.num_nodes < 1 or args.workers < 0:
            raise UsageError("--num-nodes must be >= 1 and --workers >= 0")
    if args.image:
        from vglaw.data.text import check_expression

        args.text = [check_expression(t, "--text") for t in args.text]
        if not Path(args.image).is_file():
            raise MissingFileError(f"image not found: {args.image}")
        out, figures = single_outputs(args)
    else:  # every output checked before the model is loaded
        output = batch_output(args)
        pairs, bad = read_pairs(args)
        overlays = overlay_paths(args, pairs)
    # the library (torch) loads once the arguments and outputs are checked: --help answers without it
    from vglaw.inference import Grounder, resolve_device, resolve_model

    if args.devices is not None:
        return predict_sharded_command(args, pairs, bad, output)
    grounder = Grounder(resolve_model(args.model), resolve_device(args.device), precision=args.precision)
    if batch:
        return predict_many(args, grounder, pairs, bad, output, overlays)
    return predict_one(args, grounder, out, figures)
