"""`vglaw bench` / `make bench`: cost of VG-LAW, measured side by side in one run.

Writes bench/results.json and bench/results.md and prints the Markdown. Every timing is the
median of interleaved repeats after a warm-up; ratios compare runs taken in the same loop.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import vglaw
from vglaw.models.vitdet import ViTDet

H100_BF16_DENSE_TFLOPS = 989.0  # NVIDIA's dense bf16 peak for the H100 SXM, used for MFU


def bert_base_folder() -> str:
    """A local folder holding BERT-base's config (12 x 768): the paper's text encoder shape,
    built without a download (weights are random, which does not change the cost)."""
    from transformers import BertConfig

    path = Path(tempfile.gettempdir()) / "vglaw-bench-bert-base"
    if not (path / "config.json").is_file():
        BertConfig().save_pretrained(path)
    return str(path)


def build(name: str) -> nn.Module:
    if name == "vglaw_vitb":
        return vglaw.create_model("vglaw_vitb", text_encoder=bert_base_folder(), text_pretrained=False)
    return vglaw.create_model(name, text_pretrained=False)


def inputs(model, batch: int, size: int | None = None, tokens: int = 20, device="cpu"):
    size = size or model.img_size
    ids = torch.randint(1000, 2000, (batch, tokens), device=device)
    ids[:, 0] = 101
    return torch.randn(batch, 3, size, size, device=device), ids, torch.ones_like(ids)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (2 per multiply-add) of one call. Call it on a model with requires_grad off: the
    counter's module tracker rejects outputs that are views of trainable parameters."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # The fused CPU attention kernel is invisible to the counter; the math backend decomposes
    # attention into counted matrix products.
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def timeit(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, sync=lambda: None) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved so drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_rss_growth(fn: Callable[[], object]) -> float | None:
    """Peak resident memory growth (MiB) while `fn` runs (Linux: VmHWM reset through clear_refs)."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed memory so growth is seen
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    read = lambda key: int(next(ln for ln in status.read_text().splitlines() if ln.startswith(key)).split()[1])
    before = read("VmRSS:")
    fn()
    return (read("VmHWM:") - before) / 1024


def model_costs(name: str, quick: bool) -> dict:
    model = build(name).eval()
    params = sum(p.numel() for p in model.parameters())
    model.requires_grad_(False)
    x = inputs(model, 1)
    with torch.no_grad():
        total = count_flops(lambda: model(*x))
        text = count_flops(lambda: model.text(x[1], x[2]))
        qkv = model.language_weights(x[1], x[2]).qkv
        backbone = count_flops(lambda: model.forward_features(x[0], qkv))
        static = count_flops(lambda: model.forward_features(x[0], None))
    out = {
        "params_M": params / 1e6,
        "params_visual_M": sum(p.numel() for p in model.backbone.parameters()) / 1e6,
        "params_text_M": sum(p.numel() for p in model.text.parameters()) / 1e6,
        "gflops": total / 1e9, "gflops_text": text / 1e9, "gflops_backbone": backbone / 1e9,
        "gflops_static_backbone": static / 1e9, "img_size": model.img_size,
    }
    reps = 2 if quick else 5
    with torch.no_grad():
        b1, b8 = inputs(model, 1), inputs(model, 8 if not quick or name != "vglaw_vitb" else 2)
        t = timeit({"b1": lambda: model(*b1), "b8": lambda: model(*b8)}, reps)
    out["cpu_latency_b1_ms"] = t["b1"] * 1e3
    out["cpu_throughput_batch"] = b8[0].shape[0]
    out["cpu_throughput_img_s"] = b8[0].shape[0] / t["b8"]
    model.requires_grad_(True)
    out["cpu_train_step"] = train_step_time(model, 8 if name != "vglaw_vitb" else 2, 2 if quick else 4)
    return out


def train_step_time(model: nn.Module, batch: int, repeats: int, device="cpu", dtype=None) -> dict:
    """Forward + backward + AdamW step of the multi-task loss."""
    from vglaw.training.losses import grounding_loss

    model.train()
    opt = torch.optim.AdamW(model.parameters(), 1e-5)
    x = inputs(model, batch, device=device)
    boxes = torch.rand(batch, 4, device=device) * 0.5 + 0.25
    masks = (torch.rand(batch, model.img_size, model.img_size, device=device) > 0.5).float()
    weights = {"l1": 1.0, "giou": 1.0, "focal": 4.0, "dice": 4.0}

    def step():
        with torch.autocast(device_type=device if isinstance(device, str) else device.type, dtype=dtype,
                            enabled=dtype is not None):
            loss = grounding_loss(model(*x), boxes, masks, weights)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    t = timeit({"step": step}, repeats, sync=sync)["step"]
    model.eval()
    return {"batch": batch, "step_s": t, "img_s": batch / t}


def backbone_comparison(size: int, batch: int, repeats: int) -> dict:
    """Language-adaptive vs static ViTDet-B vs timm samvit_base_patch16 (neck removed), same input."""
    import timm

    torch.manual_seed(0)
    ours = ViTDet(img_size=size, drop_path_rate=0.0).eval()
    wg = vglaw.models.language.WeightGenerator(48, 768, 12, 32)
    with torch.no_grad():
        wg.phi_weight.normal_(0, 0.02)
    sam = timm.create_model("samvit_base_patch16", pretrained=False, img_size=size, num_classes=0).eval()
    sam.neck = nn.Identity()
    x = torch.randn(batch, 3, size, size)
    h1 = torch.randn(batch, 12, 48)
    with torch.no_grad():
        t = timeit({
            "adaptive": lambda: ours(x, wg(h1)),
            "static": lambda: ours(x, None),
            "timm_sam": lambda: sam.forward_features(x),
        }, repeats)
    return {"img_size": size, "batch": batch, **{f"{k}_s": v for k, v in t.items()},
            "adaptive_over_static": t["adaptive"] / t["static"], "static_over_timm": t["static"] / t["timm_sam"]}


def scaling(name: str, batches: list[int], sizes: list[int], repeats: int) -> list[dict]:
    """Time and peak memory growth of a forward against batch size and input size."""
    model = build(name).eval()
    rows = []
    with torch.no_grad():
        for size in sizes:
            for batch in batches if size == model.img_size else [1]:
                x = inputs(model, batch, size)
                t = timeit({"f": lambda x=x: model(*x)}, repeats)["f"]
                mem = peak_rss_growth(lambda x=x: model(*x))
                rows.append({"img_size": size, "batch": batch, "time_s": t, "img_s": batch / t, "peak_mib": mem})
    return rows


def data_throughput(root: str, img_size: int, n: int) -> dict:
    """Decode + augment + collate on the shapes dataset, in this process (= one worker)."""
    from vglaw.data.datamodule import Collate
    from vglaw.data.refer import ReferDataset
    from vglaw.data.shapes import generate
    from vglaw.data.transforms import GroundingTransform

    if not (Path(root) / "shapes" / "instances.json").is_file():
        generate(root, 0, {"train": 200, "val": 20, "test": 20}, progress=False)
    ds = ReferDataset(root, "shapes", "train", transform=GroundingTransform(img_size, train=True))
    collate = Collate("minilm")
    collate([ds[0], ds[1]])  # load the tokenizer outside the timing
    t = time.perf_counter()
    for start in range(0, n, 16):
        collate([ds[i % len(ds)] for i in range(start, start + 16)])
    return {"img_size": img_size, "img_s_per_worker": n / (time.perf_counter() - t)}


def gpu_section(quick: bool) -> dict | None:
    if not torch.cuda.is_available():
        return None
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    model = build("vglaw_vitb").to(dev).eval().requires_grad_(False)
    flops = count_flops(lambda: model(*inputs(model, 1, device=dev)))
    out = {"device": torch.cuda.get_device_name(), "gflops_per_pair": flops / 1e9}
    for dtype, tag in ((None, "fp32"), (torch.bfloat16, "bf16")):
        for batch in (1, 64) if quick else (1, 32, 128, 256):
            x = inputs(model, batch, device=dev)

            def fwd(x=x, dtype=dtype):
                with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                    model(*x)

            t = timeit({"f": fwd}, 5 if quick else 20, warmup=3, sync=torch.cuda.synchronize)["f"]
            out[f"infer_{tag}_b{batch}_img_s"] = batch / t
        out[f"infer_{tag}_mfu"] = out[f"infer_{tag}_b{batch}_img_s"] * flops / (H100_BF16_DENSE_TFLOPS * 1e12)
    model.requires_grad_(True)
    for batch in (64,) if quick else (64, 128):
        torch.cuda.reset_peak_memory_stats()
        r = train_step_time(model, batch, 5, device=dev, dtype=torch.bfloat16)
        out[f"train_bf16_b{batch}_img_s"] = r["img_s"]
        out[f"train_bf16_b{batch}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out[f"train_bf16_b{batch}_mfu"] = r["img_s"] * 3 * flops / (H100_BF16_DENSE_TFLOPS * 1e12)
    return out


def to_markdown(r: dict) -> str:
    lines = [f"Machine: {r['machine']}, torch {r['torch']}, {r['threads']} CPU threads; mode: {r['mode']}.",
             ""]
    lines += ["| model | params (M) | visual / text (M) | GFLOPs / pair | CPU latency b1 (ms) | CPU throughput (img/s) "
              "| CPU train step (img/s) |", "|---|---|---|---|---|---|---|"]
    for name, m in r["models"].items():
        lines.append(f"| {name} @ {m['img_size']} | {m['params_M']:.1f} | {m['params_visual_M']:.1f} / "
                     f"{m['params_text_M']:.1f} | {m['gflops']:.1f} (text {m['gflops_text']:.1f}, backbone "
                     f"{m['gflops_backbone']:.1f}) | {m['cpu_latency_b1_ms']:.0f} | {m['cpu_throughput_img_s']:.2f} "
                     f"(b{m['cpu_throughput_batch']}) | {m['cpu_train_step']['img_s']:.2f} "
                     f"(b{m['cpu_train_step']['batch']}) |")
    c = r["backbone"]
    lines += ["", f"Backbones at {c['img_size']}, batch {c['batch']} (CPU, interleaved medians):", "",
              "| language-adaptive | static | timm samvit_base_patch16 | adaptive / static | static / timm |",
              "|---|---|---|---|---|",
              f"| {c['adaptive_s']:.3f} s | {c['static_s']:.3f} s | {c['timm_sam_s']:.3f} s | "
              f"{c['adaptive_over_static']:.3f} | {c['static_over_timm']:.3f} |"]
    lines += ["", "Forward scaling (CPU, vglaw_vitb):", "",
              "| input | batch | time (s) | img/s | peak RSS growth (MiB) |", "|---|---|---|---|---|"]
    for s in r["scaling"]:
        mem = "n/a" if s["peak_mib"] is None else f"{s['peak_mib']:.0f}"
        lines.append(f"| {s['img_size']} | {s['batch']} | {s['time_s']:.3f} | {s['img_s']:.2f} | {mem} |")
    lines += ["", "Data pipeline vs training (one worker, shapes, CPU):", "",
              "| input | data img/s per worker | model train img/s | bound by |", "|---|---|---|---|"]
    for d in r["data"]:
        train = r["models"]["vglaw_small" if d["img_size"] == 128 else "vglaw_vitb"]["cpu_train_step"]["img_s"]
        lines.append(f"| {d['img_size']} | {d['img_s_per_worker']:.0f} | {train:.2f} | "
                     f"{'data' if d['img_s_per_worker'] < train else 'model'} |")
    if r["gpu"]:
        lines += ["", f"GPU ({r['gpu']['device']}):", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in r["gpu"].items()]
    else:
        lines += ["", "GPU: none present in this run."]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vglaw bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (< 2 min on 2 cores)")
    parser.add_argument("--out", default="bench", help="folder for results.json and results.md")
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "vglaw-bench-shapes"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    q = args.quick
    start = time.time()
    report = {"mode": "quick" if q else "full", "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    steps = [
        ("models", lambda: {n: model_costs(n, q) for n in ("vglaw_small", "vglaw_vitb")}),
        ("backbone", lambda: backbone_comparison(224 if q else 448, 2 if q else 8, 3 if q else 7)),
        ("scaling", lambda: scaling("vglaw_vitb", [1, 2] if q else [1, 2, 4, 8], [224, 448] if q else
                                    [224, 320, 448, 640], 1 if q else 3)),
        ("data", lambda: [data_throughput(args.data, s, 64 if q else 512) for s in (128, 448)]),
        ("gpu", lambda: gpu_section(q)),
    ]
    from tqdm import tqdm

    for key, fn in tqdm(steps, desc="bench", unit="part"):
        report[key] = fn()
    report["wall_s"] = time.time() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    md = to_markdown(report)
    (out / "results.md").write_text(md + "\n")
    print(md)
    print(f"\nwrote {out / 'results.json'} and {out / 'results.md'} in {report['wall_s']:.0f} s")
    return 0
