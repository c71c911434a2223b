"""`vglaw bench` / `make bench`: cost of VG-LAW, measured side by side in one run.

Writes bench/results.json and bench/results.md and prints the Markdown. Every timing is reported
as median (min–max) over interleaved repeats after a warm-up; a ratio is taken round by round
and, against a target, says whether it meets it, misses it, or is inconclusive because its
spread straddles the target.
"""
from __future__ import annotations

import ctypes
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm
from transformers import BertConfig

import vglaw
from vglaw.bench.timing import Ratio, timeit
from vglaw.data.datamodule import Collate
from vglaw.data.refer import ReferDataset
from vglaw.data.shapes import generate
from vglaw.data.transforms import GroundingTransform
from vglaw.inference.export import export_onnx
from vglaw.inference.onnx import OnnxModel
from vglaw.models.vitdet import ViTDet
from vglaw.training.losses import grounding_loss

H100_BF16_DENSE_TFLOPS = 989.0  # NVIDIA's dense bf16 peak for the H100 SXM, used for MFU


def bert_base_folder() -> str:
    """A local folder holding BERT-base's config (12 x 768): the paper's text encoder shape,
    built without a download (weights are random, which does not change the cost)."""
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
    # The fused CPU attention kernel is invisible to the counter; the math backend decomposes
    # attention into counted matrix products.
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


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
    reps = 3 if quick else 5
    with torch.no_grad():
        big = 8 if name != "vglaw_vitb" else (2 if quick else 8)
        b1, b8 = inputs(model, 1), inputs(model, big)
        t = timeit({"b1": lambda: model(*b1), "b8": lambda: model(*b8)}, reps)
    out["cpu_latency_b1"] = t["b1"].summary()
    out["cpu_throughput_batch"] = big
    out["cpu_throughput"] = t["b8"].summary()
    if quick and name == "vglaw_vitb":
        out["cpu_train_step"] = None  # a ViT-B step at 448 takes ~10 s on 2 cores: full mode only
    else:
        model.requires_grad_(True)
        out["cpu_train_step"] = train_step_time(model, 8 if name != "vglaw_vitb" else 2, 3 if quick else 4)
    return out


def train_step_time(model: nn.Module, batch: int, repeats: int, device="cpu", dtype=None) -> dict:
    """Forward + backward + AdamW step of the multi-task loss."""
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
    return {"batch": batch, **t.summary(), "img_s": batch / t.median}


def backbone_comparison(size: int, batch: int, repeats: int) -> dict:
    """Language-adaptive vs static ViTDet-B vs timm samvit_base_patch16 (neck removed), same input."""
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
    a_s, s_t = Ratio.of(t["adaptive"], t["static"]), Ratio.of(t["static"], t["timm_sam"])
    return {"img_size": size, "batch": batch, **{k: v.summary() for k, v in t.items()},
            "adaptive_over_static": {"values": a_s.values, "median": a_s.median, "target": 1.05,
                                     "verdict": a_s.verdict(1.05), "text": a_s.text(1.05)},
            "static_over_timm": {"values": s_t.values, "median": s_t.median, "target": 1.0,
                                 "verdict": s_t.verdict(1.0), "text": s_t.text(1.0)}}


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
                rows.append({"img_size": size, "batch": batch, **t.summary(), "img_s": batch / t.median,
                             "peak_mib": mem})
    return rows


def data_throughput(root: str, img_size: int, n: int) -> dict:
    """Decode + augment + collate on the shapes dataset, in this process (= one worker)."""
    if not (Path(root) / "shapes" / "instances.json").is_file():
        generate(root, 0, {"train": 200, "val": 20, "test": 20}, progress=False)
    ds = ReferDataset(root, "shapes", "train", transform=GroundingTransform(img_size, train=True))
    collate = Collate("minilm")
    collate([ds[0], ds[1]])  # load the tokenizer outside the timing
    t = time.perf_counter()
    for start in range(0, n, 16):
        collate([ds[i % len(ds)] for i in range(start, start + 16)])
    return {"img_size": img_size, "img_s_per_worker": n / (time.perf_counter() - t)}


def onnx_comparison(name: str, batches: tuple[int, ...], repeats: int) -> dict:
    """ONNX Runtime vs PyTorch on the CPU, same model and inputs, interleaved: latency at batch 1
    and throughput at the larger batch, with the threads torch uses."""
    model = build(name).eval()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        model.save_pretrained(folder)
        start = time.time()
        path, _ = export_onnx(folder, Path(tmp) / "model.onnx", check=False)  # the export alone is timed
        export_s = time.time() - start
        ort = OnnxModel(path, threads=torch.get_num_threads())
        rows = {}
        with torch.no_grad():
            for batch in batches:
                x = inputs(model, batch)
                t = timeit({"torch": lambda x=x: model(*x), "onnxruntime": lambda x=x: ort(*x)}, repeats)
                r = Ratio.of(t["onnxruntime"], t["torch"])
                rows[f"b{batch}"] = {"torch": t["torch"].summary(), "onnxruntime": t["onnxruntime"].summary(),
                                     "ort_over_torch": {"values": r.values, "median": r.median, "text": r.text()}}
        size_mb = path.stat().st_size / 2**20
    return {"model": name, "img_size": model.img_size, "export_s": export_s, "onnx_mb": size_mb, **rows}


def cpu_peak() -> dict:
    """The CPU's fp32 peak as derived here: cores x clock x fp32 FLOPs per cycle, with 2 FMA
    pipes of 8 fp32 lanes (AVX2: 32 FLOPs per cycle) or of 16 lanes (AVX-512: 64; a part that
    splits 512-bit operations in two, as Zen 4 does, reaches half of that). The clock is the
    one /proc/cpuinfo reports (a virtual machine's base clock; boost is not counted)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    mhz = next((float(ln.split(":", 1)[1]) for ln in info.splitlines() if ln.startswith("cpu MHz")), float("nan"))
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
    per_cycle = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 8
    cores = torch.get_num_threads()
    return {"cpu": name, "ghz": mhz / 1e3, "cores": cores, "fp32_flops_per_cycle": per_cycle,
            "peak_gflops": cores * mhz / 1e3 * per_cycle,
            "flags": sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8",
                                     "avx_vnni"})}


def cpu_precision(names: tuple[str, ...], batches: tuple[int, ...], repeats: int) -> dict:
    """Each precision side by side, interleaved: PyTorch fp32 (eager), bf16 (autocast), int8
    (dynamic quantisation) and ONNX Runtime fp32 and int8, with each one's speed-up over fp32
    eager round by round, and fp32's share of the CPU's peak (`cpu_peak`)."""
    from vglaw.inference.precision import autocast, quantize_int8

    peak = cpu_peak()
    out = {"peak": peak, "models": []}
    for name in names:
        model = build(name).eval()
        int8 = quantize_int8(model)
        flops = count_flops(lambda m=model: m(*inputs(m, 1)))
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "model"
            model.save_pretrained(folder)
            ort32 = OnnxModel(export_onnx(folder, Path(tmp) / "fp32.onnx", check=False)[0], threads=peak["cores"])
            ort8 = OnnxModel(export_onnx(folder, Path(tmp) / "int8.onnx", check=False, quantize="int8")[0],
                             threads=peak["cores"])
            row = {"model": name, "img_size": model.img_size, "gflops_per_pair": flops / 1e9}
            for batch in batches:
                x = inputs(model, batch)

                def bf16(x=x, model=model):
                    with autocast("bf16", torch.device("cpu")):
                        return model(*x)

                fns = {"torch_fp32": lambda x=x, m=model: m(*x), "torch_bf16": bf16,
                       "torch_int8": lambda x=x, m=int8: m(*x), "ort_fp32": lambda x=x, m=ort32: m(*x),
                       "ort_int8": lambda x=x, m=ort8: m(*x)}
                with torch.no_grad():
                    t = timeit(fns, repeats)
                base = t["torch_fp32"]
                row[f"b{batch}"] = {
                    k: {**v.summary(), "speedup": {"values": (r := Ratio.of(base, v)).values, "median": r.median,
                                                   "text": r.text()}} for k, v in t.items()}
                row[f"b{batch}"]["fp32_share_of_peak"] = flops * batch / base.median / 1e9 / peak["peak_gflops"]
            out["models"].append(row)
    return out


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
            out[f"infer_{tag}_b{batch}_img_s"] = batch / t.median
        out[f"infer_{tag}_mfu"] = out[f"infer_{tag}_b{batch}_img_s"] * flops / (H100_BF16_DENSE_TFLOPS * 1e12)
    model.requires_grad_(True)
    for batch in (64,) if quick else (64, 128):
        torch.cuda.reset_peak_memory_stats()
        r = train_step_time(model, batch, 5, device=dev, dtype=torch.bfloat16)
        out[f"train_bf16_b{batch}_img_s"] = r["img_s"]
        out[f"train_bf16_b{batch}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out[f"train_bf16_b{batch}_mfu"] = r["img_s"] * 3 * flops / (H100_BF16_DENSE_TFLOPS * 1e12)
    return out


def run_all(quick: bool, data: str, threads: int | None = None) -> dict:
    """Every measurement of `vglaw bench` (small sizes and few repeats with `quick`), as the
    report `vglaw.bench.report.to_markdown` renders."""
    if threads:
        torch.set_num_threads(threads)
    q = quick
    report = {"mode": "quick" if q else "full", "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    steps = [
        ("models", lambda: {n: model_costs(n, q) for n in ("vglaw_small", "vglaw_vitb")}),
        ("backbone", lambda: backbone_comparison(224 if q else 448, 2 if q else 8, 5 if q else 7)),
        ("scaling", lambda: scaling("vglaw_vitb", [1, 2] if q else [1, 2, 4, 8], [224, 448] if q else
                                    [224, 320, 448, 640], 1 if q else 3)),
        ("data", lambda: [data_throughput(data, s, 64 if q else 512) for s in (128, 448)]),
        ("onnx", lambda: [onnx_comparison("vglaw_small", (1, 8), 5 if q else 10)]
         + ([] if q else [onnx_comparison("vglaw_vitb", (1, 4), 3)])),
        ("cpu_precision", lambda: cpu_precision(("vglaw_small",) if q else ("vglaw_small", "vglaw_vitb"),
                                                (1, 8), 3 if q else 4)),
        ("gpu", lambda: gpu_section(q)),
    ]
    for key, fn in tqdm(steps, desc="bench", unit="part"):
        report[key] = fn()
    return report
