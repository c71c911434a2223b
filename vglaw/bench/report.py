"""`vglaw bench`'s Markdown report."""
from __future__ import annotations


def _t(summary: dict | None, unit: float = 1.0, digits: int = 3, suffix: str = " s") -> str:
    """median (min–max) of a timing summary."""
    if not summary:
        return "n/a"
    f = lambda v: f"{v * unit:.{digits}f}"  # noqa: E731
    return f"{f(summary['median_s'])}{suffix} ({f(summary['min_s'])}–{f(summary['max_s'])})"


def to_markdown(r: dict) -> str:
    lines = [f"Machine: {r['machine']}, torch {r['torch']}, {r['threads']} CPU threads; mode: {r['mode']}; "
             f"{r.get('wall_s', 0):.0f} s. Times are median (min–max) over interleaved repeats.", ""]
    lines += ["| model | params (M) | visual / text (M) | GFLOPs / pair | CPU latency b1 | CPU throughput "
              "| CPU train step |", "|---|---|---|---|---|---|---|"]
    for name, m in r["models"].items():
        thr = m["cpu_throughput"]
        b = m["cpu_throughput_batch"]
        train = m["cpu_train_step"]
        train_text = f"{train['img_s']:.2f} img/s (b{train['batch']})" if train else "n/a (full mode)"
        lines.append(f"| {name} @ {m['img_size']} | {m['params_M']:.1f} | {m['params_visual_M']:.1f} / "
                     f"{m['params_text_M']:.1f} | {m['gflops']:.1f} (text {m['gflops_text']:.1f}, backbone "
                     f"{m['gflops_backbone']:.1f}) | {_t(m['cpu_latency_b1'], 1e3, 0, ' ms')} | "
                     f"{b / thr['median_s']:.2f} img/s (b{b}) | {train_text} |")
    c = r["backbone"]
    lines += ["", f"Backbones at {c['img_size']}, batch {c['batch']} (CPU):", "",
              "| language-adaptive | static | timm samvit_base_patch16 | adaptive / static | static / timm |",
              "|---|---|---|---|---|",
              f"| {_t(c['adaptive'])} | {_t(c['static'])} | {_t(c['timm_sam'])} | {c['adaptive_over_static']['text']} "
              f"| {c['static_over_timm']['text']} |"]
    lines += ["", "Forward scaling (CPU, vglaw_vitb):", "",
              "| input | batch | time | img/s | peak RSS growth (MiB) |", "|---|---|---|---|---|"]
    for s in r["scaling"]:
        mem = "n/a" if s["peak_mib"] is None else f"{s['peak_mib']:.0f}"
        lines.append(f"| {s['img_size']} | {s['batch']} | {_t(s)} | {s['img_s']:.2f} | {mem} |")
    lines += ["", "Data pipeline vs training (one worker, shapes, CPU):", "",
              "| input | data img/s per worker | model train img/s | bound by |", "|---|---|---|---|"]
    for d in r["data"]:
        train = r["models"]["vglaw_small" if d["img_size"] == 128 else "vglaw_vitb"]["cpu_train_step"]
        if train:
            lines.append(f"| {d['img_size']} | {d['img_s_per_worker']:.0f} | {train['img_s']:.2f} | "
                         f"{'data' if d['img_s_per_worker'] < train['img_s'] else 'model'} |")
    if r.get("onnx"):
        lines += ["", "ONNX Runtime vs PyTorch (CPU, same threads, interleaved):", "",
                  "| model | export | batch | PyTorch | ONNX Runtime | ORT / PyTorch time | ORT img/s |",
                  "|---|---|---|---|---|---|---|"]
        for o in r["onnx"]:
            for key in (k for k in o if k.startswith("b") and k[1:].isdigit()):
                row, batch = o[key], int(key[1:])
                lines.append(f"| {o['model']} @ {o['img_size']} | {o['export_s']:.0f} s, {o['onnx_mb']:.0f} MB | "
                             f"{batch} | {_t(row['torch'], 1e3, 0, ' ms')} | {_t(row['onnxruntime'], 1e3, 0, ' ms')} | "
                             f"{row['ort_over_torch']['text']} | {batch / row['onnxruntime']['median_s']:.2f} |")
    if r.get("cpu_precision"):
        lines += ["", *precision_lines(r["cpu_precision"])]
    if r["gpu"]:
        lines += ["", f"GPU ({r['gpu']['device']}):", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in r["gpu"].items()]
    else:
        lines += ["", "GPU: none present in this run."]
    return "\n".join(lines)


def precision_lines(c: dict) -> list[str]:
    """The `cpu_precision` section as Markdown lines."""
    pk = c["peak"]
    lines = [f"Precision on the CPU ({pk['cpu']}, {pk['cores']} threads; flags: {', '.join(pk['flags'])}; "
             f"fp32 peak {pk['peak_gflops']:.0f} GFLOP/s = {pk['cores']} cores x {pk['ghz']:.2f} GHz x "
             f"{pk['fp32_flops_per_cycle']} FLOPs/cycle). Time, and speed-up over PyTorch fp32 eager "
             "(round by round, median (min–max)):", "",
             "| model | batch | fp32 eager | fp32 % of peak | bf16 | int8 | ORT fp32 | ORT int8 |",
             "|---|---|---|---|---|---|---|---|"]
    for m in c["models"]:
        for key in (k for k in m if k.startswith("b") and k[1:].isdigit()):
            row = m[key]
            cell = lambda k, row=row: (f"{_t(row[k], 1e3, 0, ' ms')}, x{row[k]['speedup']['text']}")  # noqa: E731
            lines.append(f"| {m['model']} @ {m['img_size']} | {key[1:]} | {_t(row['torch_fp32'], 1e3, 0, ' ms')} | "
                         f"{100 * row['fp32_share_of_peak']:.0f}% | {cell('torch_bf16')} | {cell('torch_int8')} | "
                         f"{cell('ort_fp32')} | {cell('ort_int8')} |")
    return lines
