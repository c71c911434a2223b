"""`vglaw serve`: a Gradio page to ground expressions in an uploaded (or example) image.

    vglaw serve --model outputs/demo/logs/demo/model --port 7860

Upload or pick an image, type one or more expressions (one per line), and see the overlay
(masks, boxes, labels, scores), the results as JSON and, on request, the explanation figures
(block x word language weights, pooling or centre map). The model is loaded once; requests
run one at a time on it, each with its own inputs and outputs. Images up to the reader's
limit (250 MP) are accepted and read at a bounded working size.
"""
from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path

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
    return app


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vglaw serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder, hub id, .ckpt or .onnx (default: the latest)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    parser.add_argument("--data", default="data", help="where the shapes datasets are, for the examples")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    args = parser.parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError as err:
        raise UsageError("vglaw serve needs Gradio: pip install -e '.[serve]' (make setup installs it)") from err
    from vglaw.inference import Grounder, resolve_model

    grounder = Grounder(resolve_model(args.model), args.device)
    app = build_app(grounder, demo_examples(grounder.model, args.data))
    print(f"vglaw serve: http://{args.host}:{args.port}  (Ctrl+C to stop)")
    app.launch(server_name=args.host, server_port=args.port, show_error=True)
    return 0
