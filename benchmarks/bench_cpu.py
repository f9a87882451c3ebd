"""CPU benchmark: int8mm's fused int8_linear (reference backend) against float and bitsandbytes baselines.

One square layer, K = N = 4096 (a Llama-7B-sized projection), at decode (M=1), small batch (M=16) and
prefill (M=512). Weights are quantized once beforehand; the inputs carry 8 planted outlier columns of
magnitude 20-60 (threshold 6.0), as LLM.int8() sees in large models. Every row is measured in the same
run so the ratios compare like with like; times are medians of host-clock timings after warm-up, with
inputs rotated over a few buffers.

    python benchmarks/bench_cpu.py [--reps N]
"""
import argparse
import datetime
import logging
import platform
import sys

import torch
import torch.nn.functional as F

import int8mm
from int8mm.bench import time_cpu

K = N = 4096
ROWS = (1, 16, 512)
THRESHOLD = 6.0
N_OUTLIER_COLS = 8
ROTATIONS = 3  # input buffers cycled through, so no call finds its input already in cache


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def planted_inputs(m: int, cols: torch.Tensor, seed: int) -> torch.Tensor:
    """N(0, 1) activations whose ``cols`` carry magnitudes 20-60 with random signs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, K, generator=g)
    magnitude = 20 + 40 * torch.rand(m, cols.numel(), generator=g)
    sign = torch.randint(0, 2, (m, cols.numel()), generator=g) * 2 - 1
    x[:, cols] = magnitude * sign
    return x


def bnb_layer(weight: torch.Tensor):
    """bitsandbytes' Linear8bitLt from the same float weight (quantized on .to('cpu')), or None."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None, "bitsandbytes not installed"
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # it warns on every fp32 -> fp16 input cast
    layer = bnb.nn.Linear8bitLt(K, N, bias=False, has_fp16_weights=False, threshold=THRESHOLD)
    layer.load_state_dict({"weight": weight.clone()})
    layer = layer.to("cpu").eval()
    return layer, f"bitsandbytes {bnb.__version__}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=0, help="timed calls per cell (default: by M)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    weight = torch.randn(N, K) * 0.02
    weight_bf16 = weight.bfloat16()
    q_w, s_w = int8mm.quantize_weight(weight)
    bnb, bnb_note = bnb_layer(weight)
    cols = torch.randperm(K, generator=torch.Generator().manual_seed(1))[:N_OUTLIER_COLS]

    print(f"# int8mm CPU benchmark, K = N = {K}, {N_OUTLIER_COLS} outlier columns (20-60), threshold {THRESHOLD}")
    print(f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"- CPU: {cpu_model()}, torch threads: {torch.get_num_threads()}, "
          f"capability: {torch.backends.cpu.get_cpu_capability()}")
    print(f"- torch {torch.__version__}, int8mm {int8mm.__version__}, {bnb_note}, Python {platform.python_version()}")
    print("- median ms per call (ratio = fp32 F.linear time / this time; > 1 is faster)\n")

    header = ["M", "fp32 F.linear", "bf16 F.linear", "int8mm fp32", "int8mm bf16", "bnb Linear8bitLt fp32",
              "torch._int_mm (GEMM only)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    with torch.inference_mode():
        for m in ROWS:
            reps = args.reps or (5 if m >= 256 else 40)
            xs = [planted_inputs(m, cols, seed=10 * m + i) for i in range(ROTATIONS)]
            xs_bf16 = [x.bfloat16() for x in xs]
            q_xs = [int8mm.quantize_activations(x, THRESHOLD)[0] for x in xs]
            cells = {
                "fp32 F.linear": (lambda x: F.linear(x, weight), xs),
                "bf16 F.linear": (lambda x: F.linear(x, weight_bf16), xs_bf16),
                "int8mm fp32": (lambda x: int8mm.int8_linear(x, q_w, s_w, None, THRESHOLD), xs),
                "int8mm bf16": (lambda x: int8mm.int8_linear(x, q_w, s_w, None, THRESHOLD), xs_bf16),
                "bnb Linear8bitLt fp32": (bnb, xs) if bnb is not None else None,
                "torch._int_mm (GEMM only)": (lambda q: torch._int_mm(q, q_w.t()), q_xs),
            }
            times = {}
            for name, cell in cells.items():
                if cell is None:
                    continue
                fn, inputs = cell
                times[name] = time_cpu(fn, [(x,) for x in inputs], warmup=2, reps=reps).median_s
            base = times["fp32 F.linear"]
            row = [str(m)]
            for name in header[1:]:
                if name not in times:
                    row.append("n/a")
                elif name == "fp32 F.linear":
                    row.append(f"{1e3 * base:.3f}")
                else:
                    row.append(f"{1e3 * times[name]:.3f} ({base / times[name]:.2f}x)")
            print("| " + " | ".join(row) + " |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
