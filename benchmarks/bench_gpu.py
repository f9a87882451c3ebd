"""Side-by-side GPU benchmark of the full int8 linear forward (quantization included).

fp16 F.linear vs int8mm (each GPU backend) vs bitsandbytes Linear8bitLt, on Llama-3-8B/70B layer
shapes, fp16 inputs with planted outlier columns (default 8 columns at 20-60, threshold 6.0).
Eager timings flush L2 before each call; graph timings replay a CUDA graph over rotating inputs
and weights (bitsandbytes cannot be captured: its outlier path syncs with the host).

    python benchmarks/bench_gpu.py --out DIR [--m 1 16 2048] [--models Llama-3-8B Llama-3-70B]
Writes DIR/gpu_bench.json (long-form rows) and DIR/gpu_bench.md.
"""
import argparse
import datetime
import json
import math
import os
import platform

import torch
import torch.nn.functional as F

import int8mm
from int8mm.bench import LAYER_SHAPES, time_cuda_eager, time_cuda_graph

THRESHOLD = 6.0


def planted_input(m, k, n_cols, low, high, gen):
    x = torch.randn(m, k, device="cuda", generator=gen).half()
    cols = torch.randperm(k, device="cuda", generator=gen)[:n_cols]
    mags = low + (high - low) * torch.rand(n_cols, device="cuda", generator=gen)
    signs = torch.randint(0, 2, (n_cols,), device="cuda", generator=gen) * 2 - 1
    x[:, cols] = (mags * signs).half()[None, :].expand(m, -1) * torch.rand(m, 1, device="cuda", generator=gen).half().clamp_min(0.5)
    return x


def ceilings():
    """Measured once per run: copy bandwidth (read + write) and int8/fp16 GEMM rates."""
    n_bytes = 2 * 1024**3
    src = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_s = time_cuda_eager(lambda: dst.copy_(src), [()], warmup=3, reps=10).median_s
    del src, dst
    a8 = torch.randint(-127, 128, (8192, 8192), dtype=torch.int8, device="cuda")
    b8 = torch.randint(-127, 128, (8192, 8192), dtype=torch.int8, device="cuda").t()
    int_mm_s = time_cuda_eager(lambda: torch._int_mm(a8, b8), [()], warmup=3, reps=10).median_s
    a16 = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b16 = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    mm_s = time_cuda_eager(lambda: a16 @ b16, [()], warmup=3, reps=10).median_s
    flops = 2 * 8192**3
    return {"copy_tb_s": 2 * n_bytes / copy_s / 1e12, "int_mm_tops": flops / int_mm_s / 1e12,
            "fp16_mm_tflops": flops / mm_s / 1e12}


def bnb_layer(weight_fp16, bias):
    import bitsandbytes as bnb
    n, k = weight_fp16.shape
    layer = bnb.nn.Linear8bitLt(k, n, bias=bias is not None, has_fp16_weights=False, threshold=THRESHOLD)
    layer.weight = bnb.nn.Int8Params(weight_fp16.cpu(), requires_grad=False, has_fp16_weights=False)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.cpu())
    return layer.cuda().eval()


def rel_error(y, ref):
    return float((y.double() - ref).norm() / ref.norm())


def bench_shape(shape, m, args, gen, backends, l2_bytes):
    k, n = shape.k, shape.n
    weight = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).half()
    bias = None
    xs = [planted_input(m, k, args.outlier_cols, args.outlier_low, args.outlier_high, gen) for _ in range(4)]
    q_w, s_w = int8mm.quantize_weight(weight)
    ref = (xs[0].double() @ weight.double().t())
    rows = []
    # enough distinct weights per graph that the set exceeds L2 twice over (at most 8)
    copies = max(1, min(8, math.ceil(2 * l2_bytes / (n * k))))
    providers = {"fp16 F.linear": (lambda x, w: F.linear(x, w), [(x, weight) for x in xs],
                                   lambda: [(xs[i % 4], weight.clone()) for i in range(copies)], 2 * n * k)}
    for backend in backends:
        def run(x, qw, sw, backend=backend):
            return int8mm.int8_linear(x, qw, sw, None, THRESHOLD, backend)
        providers[f"int8mm {backend}"] = (run, [(x, q_w, s_w) for x in xs],
                                          lambda: [(xs[i % 4], q_w.clone(), s_w.clone()) for i in range(copies)],
                                          n * k)
    if not args.no_bnb:
        layer = bnb_layer(weight, bias)
        providers["bnb Linear8bitLt t=6"] = (lambda x: layer(x), [(x,) for x in xs], None, n * k)
    base = None
    for name, (fn, inputs, graph_inputs, weight_bytes) in providers.items():
        err = rel_error(fn(*inputs[0]), ref)
        modes = {"eager": lambda: time_cuda_eager(fn, inputs)}
        if graph_inputs is not None and m <= args.graph_max_m:
            modes["graph"] = lambda: time_cuda_graph(fn, graph_inputs())
        for mode, timer in modes.items():
            t = timer()
            if name == "fp16 F.linear":
                base = base or {}
                base[mode] = t.median_s
            row = {
                "model": shape.model, "role": shape.role, "m": m, "k": k, "n": n, "provider": name, "mode": mode,
                "median_us": t.median_s * 1e6, "p20_us": t.p20_s * 1e6, "p80_us": t.p80_s * 1e6,
                "speedup_vs_fp16": base[mode] / t.median_s if base and mode in base else None,
                "tops": 2 * m * n * k / t.median_s / 1e12, "weight_tb_s": weight_bytes / t.median_s / 1e12,
                "rel_err_vs_fp64": err,
            }
            rows.append(row)
            print(f"{shape.name:28s} M={m:<5d} {name:22s} {mode:5s} {row['median_us']:9.1f} us "
                  f"x{row['speedup_vs_fp16'] or 0:5.2f} {row['tops']:7.1f} TOPS {row['weight_tb_s']:5.2f} TB/s "
                  f"err {err:.2e}", flush=True)
    return rows


def kernel_breakdown(shape, m, args, gen):
    """Per-kernel device time of one int8mm forward (torch.profiler), to see where the time goes."""
    from torch.profiler import ProfilerActivity, profile
    weight = (torch.randn(shape.n, shape.k, device="cuda", generator=gen) * 0.02).half()
    q_w, s_w = int8mm.quantize_weight(weight)
    x = planted_input(m, shape.k, args.outlier_cols, args.outlier_low, args.outlier_high, gen)
    for _ in range(3):
        int8mm.int8_linear(x, q_w, s_w, None, THRESHOLD, "triton")
    torch.cuda.synchronize()
    reps = 10
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            int8mm.int8_linear(x, q_w, s_w, None, THRESHOLD, "triton")
        torch.cuda.synchronize()
    kernels = {}
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if device_us:
            kernels[event.key[:60]] = device_us / reps
    print(f"breakdown {shape.name} M={m}: " + ", ".join(f"{k} {v:.1f} us" for k, v in kernels.items()), flush=True)
    return {"layer": shape.name, "m": m, "kernels_us": kernels}


def markdown(rows, meta):
    lines = [f"# GPU benchmark: {meta['device']}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, bitsandbytes {meta['bitsandbytes']}; "
             f"ceilings: copy {meta['ceilings']['copy_tb_s']:.2f} TB/s, torch._int_mm "
             f"{meta['ceilings']['int_mm_tops']:.0f} TOPS, fp16 matmul {meta['ceilings']['fp16_mm_tflops']:.0f} TFLOP/s", "",
             "| layer | M | provider | mode | median us (p20-p80) | vs fp16 | TOPS | weight TB/s | rel err |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sp = f"{r['speedup_vs_fp16']:.2f}x" if r["speedup_vs_fp16"] else "-"
        lines.append(f"| {r['model']} {r['role']} ({r['k']}->{r['n']}) | {r['m']} | {r['provider']} | {r['mode']} | "
                     f"{r['median_us']:.1f} ({r['p20_us']:.1f}-{r['p80_us']:.1f}) | {sp} | {r['tops']:.0f} | "
                     f"{r['weight_tb_s']:.2f} | {r['rel_err_vs_fp64']:.1e} |")
    lines += ["", "## Geometric means of speed-up vs fp16 F.linear", "", "| models | M | provider | mode | geomean |",
              "|---|---|---|---|---|"]
    groups = {}
    for r in rows:
        if r["speedup_vs_fp16"] and r["provider"] != "fp16 F.linear":
            groups.setdefault((r["model"], r["m"], r["provider"], r["mode"]), []).append(r["speedup_vs_fp16"])
    for (model, m, provider, mode), v in sorted(groups.items()):
        g = math.exp(sum(math.log(s) for s in v) / len(v))
        lines.append(f"| {model} | {m} | {provider} | {mode} | {g:.2f}x |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--m", type=int, nargs="+", default=[1, 16, 2048])
    p.add_argument("--models", nargs="+", default=["Llama-3-8B", "Llama-3-70B"])
    p.add_argument("--outlier-cols", type=int, default=8)
    p.add_argument("--outlier-low", type=float, default=20.0)
    p.add_argument("--outlier-high", type=float, default=60.0)
    p.add_argument("--graph-max-m", type=int, default=4096, help="also time CUDA-graph replay up to this M")
    p.add_argument("--no-bnb", action="store_true")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    try:
        import bitsandbytes
        bnb_version = bitsandbytes.__version__
    except ImportError:
        bnb_version, args.no_bnb = None, True
    import triton
    meta = {"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
            "triton": triton.__version__, "bitsandbytes": bnb_version, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "threshold": THRESHOLD, "outliers": [args.outlier_cols, args.outlier_low, args.outlier_high]}
    meta["ceilings"] = ceilings()
    print(json.dumps(meta), flush=True)
    backends = [b.value for b in int8mm.available_backends("cuda") if b.value != "reference"]
    l2 = getattr(props, "L2_cache_size", 50 * 1024**2)
    rows = []
    for model in args.models:
        for shape in LAYER_SHAPES[model]:
            for m in args.m:
                rows += bench_shape(shape, m, args, gen, backends, l2)
                torch.cuda.empty_cache()
    if "triton" in backends:
        meta["breakdown"] = [kernel_breakdown(LAYER_SHAPES[model][i], m, args, gen)
                             for model in args.models[-1:] for i in (1, 2) for m in args.m]
    from int8mm.backends import triton as triton_backend
    meta["autotune"] = {kind: {str(key): str(cfg) for key, cfg in tuner.cache.items()}
                        for kind, tuner in (("prefill", triton_backend._gemm_prefill),
                                            ("decode", triton_backend._gemm_decode))}
    for r in rows:
        r.update({k: meta[k] for k in ("device", "torch", "triton", "bitsandbytes", "date")})
    with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    md = markdown(rows, meta)
    with open(os.path.join(args.out, "gpu_bench.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
