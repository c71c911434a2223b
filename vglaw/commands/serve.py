"""`vglaw serve`: a Gradio page to ground expressions in an uploaded (or example) image.

    vglaw serve --model outputs/demo/logs/demo/model --port 7860

Upload or pick an image, type one or more expressions (one per line), and see the overlay
(masks, boxes, labels, scores), the results as JSON and, on request, the explanation figures
(block x word language weights, pooling or centre map). A model with a describing head also
gets a "Describe" tab: click two corners of a region (or type x1,y1,x2,y2 lines) and the model
writes an expression for each region, grounds it back and shows its listener IoU. The model is loaded once; requests
run one at a time on it, each with its own inputs and outputs. Images up to the reader's
limit (250 MP) are accepted and read at a bounded working size.
"""
from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path

from vglaw.commands import PRECISION_HELP, PRECISIONS
from vglaw.errors import UsageError, UserError


def demo_examples(model, data_root: str | Path, n: int = 3) -> list[list[str]]:
    """Test-split images and expressions of the shapes datasets, for a model of the kind trained on
    them (from scratch; generalised or not)."""
    from vglaw.models.scratch import ScratchVGLAW

    root = Path(data_root)
    examples: list[list[str]] = []
    if not isinstance(model, ScratchVGLAW):
        return examples
    if model.generalised:
        path = root / "gshapes" / "grefs(unc).json"
        if path.is_file():
            refs = [r for r in json.loads(path.read_text()) if r["split"] == "test"]
            for r in refs[: 4 * n : 4]:
                texts = "\n".join(s["sent"] for r2 in refs if r2["image_id"] == r["image_id"]
                                  for s in r2["sentences"][:1])
                examples.append([str(root / "images" / "gshapes" / r["file_name"]), texts])
    else:
        path = root / "shapes" / "refs(unc).p"
        if path.is_file():
            from vglaw.io.safe_pickle import plain_load

            refs = [r for r in plain_load(path) if r["split"] == "test"]
            for r in refs[: 4 * n : 4]:
                examples.append([str(root / "images" / "shapes" / r["file_name"]), r["sentences"][0]["sent"]])
    return [e for e in examples[:n] if Path(e[0]).is_file()]


MAX_EXPRESSIONS = 16  # per request: one request must not hold the model (and every other user) for long
MAX_EXPLAINED = 4  # explanation figures per request (each is a matplotlib figure, ~0.3 s)


def ground(grounder, lock: threading.Lock, image_path: str | None, texts: str, explain: bool) -> tuple:
    """One request: (overlay, JSON results, explanation figures, a note), or a `UserError`."""
    from vglaw.inference import WORKING_SIDE, prepare_image
    from vglaw.viz.explain import build_explain_figure
    from vglaw.viz.overlay import draw_overlay
    from vglaw.viz.plots import figure_image, pyplot

    if not image_path:
        raise UsageError("upload an image first (or pick an example)")
    lines = [t for t in (texts or "").splitlines() if t.strip()]
    if not lines:
        raise UsageError("type at least one expression, one per line")
    if len(lines) > MAX_EXPRESSIONS:
        raise UsageError(f"{len(lines)} expressions in one request; the page grounds up to {MAX_EXPRESSIONS} at a "
                         "time (use `vglaw predict --pairs` for many)")
    if explain and len(lines) > MAX_EXPLAINED:
        raise UsageError(f"explanations are drawn for up to {MAX_EXPLAINED} expressions at a time; "
                         f"this request has {len(lines)}")
    array, size = prepare_image(image_path)
    note = ""
    if max(size) > WORKING_SIDE:
        note = (f"The image is {size[1]}x{size[0]} pixels; it was read at {array.shape[1]}x{array.shape[0]} for the "
                "model. Boxes and masks in the JSON are in its original pixels.")
    with lock:  # one model, one tokenizer: requests take turns, each with its own results
        results = grounder.predict_decoded(array, size, lines, return_attention=explain)
    overlay = draw_overlay(array, results)
    report = {"width": size[1], "height": size[0], "box_format": "xyxy", "results": [r.to_json() for r in results]}
    figures = []
    if explain:
        plt = pyplot()
        for r in results:
            fig = build_explain_figure(array, r, grounder.img_size)
            figures.append(figure_image(fig))
            plt.close(fig)
    return overlay, report, figures, note


MAX_REGIONS = 8  # described per request


def parse_regions(text: str) -> list[list[float]]:
    """"x1,y1,x2,y2" lines -> boxes (one `UsageError` naming a bad line)."""
    boxes = []
    for line in (text or "").splitlines():
        if not line.strip():
            continue
        try:
            box = [float(v) for v in line.replace(" ", "").split(",")]
        except ValueError:
            box = []
        if len(box) != 4:
            raise UsageError(f"region {line.strip()!r}: expected x1,y1,x2,y2 in pixels")
        boxes.append(box)
    if not boxes:
        raise UsageError("click two corners of a region on the image, or type x1,y1,x2,y2 (one region per line)")
    if len(boxes) > MAX_REGIONS:
        raise UsageError(f"{len(boxes)} regions in one request; the page describes up to {MAX_REGIONS} at a time")
    return boxes


def describe(grounder, lock: threading.Lock, image_path: str | None, regions: str, candidates: int) -> tuple:
    """One describe request: (overlay, JSON results), or a `UserError` (a bad or outside box)."""
    from vglaw.inference import prepare_image
    from vglaw.viz.overlay import draw_descriptions

    if not image_path:
        raise UsageError("upload an image first (or pick an example)")
    boxes = parse_regions(regions)
    array, size = prepare_image(image_path)
    with lock:
        results = grounder.describe_decoded(array, size, boxes, int(candidates))
    report = {"width": size[1], "height": size[0], "box_format": "xyxy", "results": [r.to_json() for r in results]}
    return draw_descriptions(array, results, size), report


def add_corner(regions: str, pending: list | None, corner: tuple[float, float]) -> tuple[str, list | None]:
    """A click on the image: the first corner is remembered, the second closes a region, which
    is appended to the regions text as x1,y1,x2,y2."""
    if not pending:
        return regions, [corner[0], corner[1]]
    (x1, x2), (y1, y2) = sorted((pending[0], corner[0])), sorted((pending[1], corner[1]))
    line = f"{x1:.0f},{y1:.0f},{x2:.0f},{y2:.0f}"
    return ((regions or "").rstrip("\n") + "\n" + line).lstrip("\n"), None


def image_input(**kwargs):
    """The page's image input: it hands the request the uploaded file itself, as `vglaw predict`
    reads it.

    `gr.Image`'s default `image_mode="RGB"` decodes an upload and saves an RGB copy (16-bit,
    RGBA, CMYK and palette files change on the way, and a TIFF the CLI refuses would be
    grounded); with `image_mode=None` and `type="filepath"` Gradio passes the original file's
    path, so the page answers exactly as the CLI does for the same file.
    """
    import gradio as gr

    return gr.Image(type="filepath", image_mode=None, **kwargs)


def build_app(grounder, examples: list[list[str]] | None = None):
    """The Gradio page around one loaded `Grounder`."""
    import gradio as gr

    lock = threading.Lock()

    def run(image_path, texts, explain):
        try:
            overlay, report, figures, note = ground(grounder, lock, image_path, texts, explain)
        except UserError as err:
            raise gr.Error(str(err)) from err
        return overlay, report, figures, note

    # Uploads live in Gradio's cache; files older than an hour are removed every 10 minutes.
    with gr.Blocks(title="vglaw: visual grounding with language-adaptive weights", delete_cache=(600, 3600)) as app:
        gr.Markdown("## vglaw\nGround referring expressions in an image: one expression per line.")
        with gr.Row():
            with gr.Column():
                image = image_input(label="image", elem_id="image")
                texts = gr.Textbox(lines=3, label="expressions (one per line)", elem_id="texts",
                                   placeholder="the red circle\nthe star left of the blue square")
                explain = gr.Checkbox(label="explain: which words drive which block", elem_id="explain")
                button = gr.Button("Ground", variant="primary", elem_id="ground")
            with gr.Column():
                overlay = gr.Image(type="pil", label="result", elem_id="overlay", interactive=False)
                note = gr.Markdown(elem_id="note")
                report = gr.JSON(label="results (original pixels)", elem_id="json")
        gallery = gr.Gallery(label="explanations", elem_id="explanations", columns=1)
        if examples:
            gr.Examples(examples=examples, inputs=[image, texts], label="shapes test images")
        button.click(run, inputs=[image, texts, explain], outputs=[overlay, report, gallery, note],
                     concurrency_limit=1)
        if grounder.model.describes:
            describe_tab(gr, grounder, lock, image)
    return app


def describe_tab(gr, grounder, lock: threading.Lock, image) -> None:
    """The describe mode: regions clicked on (or typed for) the same image, each described."""
    pending = gr.State(None)

    def run(image_path, regions, candidates):
        try:
            return describe(grounder, lock, image_path, regions, candidates)
        except UserError as err:
            raise gr.Error(str(err)) from err

    def click(regions, corner, evt: gr.SelectData):
        return add_corner(regions, corner, tuple(evt.index))

    # Gradio finds its event argument by the annotation's type; this module's annotations are strings.
    click.__annotations__["evt"] = gr.SelectData

    gr.Markdown("### Describe a region\nClick two opposite corners of a region on the image above (or type "
                "x1,y1,x2,y2, one region per line): the model writes an expression for it and grounds it back.")
    with gr.Row():
        with gr.Column():
            regions = gr.Textbox(lines=2, label="regions (x1,y1,x2,y2 per line)", elem_id="regions")
            candidates = gr.Slider(1, 10, value=5, step=1, label="candidates per region", elem_id="candidates")
            button = gr.Button("Describe", elem_id="describe")
        with gr.Column():
            overlay = gr.Image(type="pil", label="descriptions", elem_id="described", interactive=False)
            report = gr.JSON(label="descriptions (original pixels)", elem_id="described_json")
    image.select(click, inputs=[regions, pending], outputs=[regions, pending])
    button.click(run, inputs=[image, regions, candidates], outputs=[overlay, report], concurrency_limit=1)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vglaw serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder, hub id, .ckpt or .onnx (default: the latest)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    parser.add_argument("--data", default="data", help="where the shapes datasets are, for the examples")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS, help=PRECISION_HELP)
    args = parser.parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError as err:
        raise UsageError("vglaw serve needs Gradio: pip install -e '.[serve]' (make setup installs it)") from err
    from vglaw.inference import Grounder, resolve_model

    grounder = Grounder(resolve_model(args.model), args.device, precision=args.precision)
    app = build_app(grounder, demo_examples(grounder.model, args.data))
    print(f"vglaw serve: http://{args.host}:{args.port}  (Ctrl+C to stop)")
    app.launch(server_name=args.host, server_port=args.port, show_error=True)
    return 0
