"""LoRA fine-tuning of SmolLM2-135M-Instruct on three bases, same steps: fp32, bitsandbytes 8-bit, int8mm.

Each base gets the same LoRA (r=8, alpha=16, q_proj and v_proj, no dropout, the same initial adapter weights),
the same AdamW steps on the same windows of the 1990-onward State of the Union speeches, and is scored on the same
held-out windows before training, after training, and after ``merge_and_unload()``. Reported per base: the three
held-out losses, the median seconds per training step (forward + backward + optimizer), and the peak resident
memory while training above the memory just before (sampled every 5 ms). Each base runs in its own process, so
one base's allocations do not inflate another's figures.

    python benchmarks/lora_smollm2.py [--steps 20] [--seq-len 128] [--batch 1] [--lr 2e-3] [--out DIR]
Prints a markdown table; with --out also writes DIR/lora_smollm2.{json,md}. CPU only (bitsandbytes' 8-bit path
runs on CPU); about 10 minutes on 2 cores.
"""
import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from int8mm.bench.arguments import check_script_arguments
from int8mm.bench.report import write_json_and_markdown

BASES = {"fp32": "fp32 (no quantization)", "bnb": "bitsandbytes 8-bit (threshold 6.0)",
         "int8mm": "int8mm (threshold 6.0)"}
HELD_OUT_WINDOWS = 4
HELD_OUT_OFFSET = 40_000  # tokens; training reads from token 0 on, far below this
SAMPLE_SECONDS = 0.005


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="training steps (default 20)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default 2e-3)")
    parser.add_argument("--out", help="directory for lora_smollm2.{json,md}")
    parser.add_argument("--only", choices=sorted(BASES), help=argparse.SUPPRESS)  # one base, in a child process
    return parser


class PeakRss:
    """Samples this process's resident memory in a thread; ``peak`` is the largest sample."""

    def __init__(self):
        import psutil

        self._process = psutil.Process()
        self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(SAMPLE_SECONDS):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def load_base(name: str, checkpoint: Path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import int8mm

    if name == "fp32":
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        for param in model.parameters():
            param.requires_grad_(False)
        return model
    if name == "bnb":
        from peft import prepare_model_for_kbit_training

        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # it warns on every fp32 matmul
        model = AutoModelForCausalLM.from_pretrained(
            checkpoint, quantization_config=BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0))
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    from int8mm.integrations.peft import prepare_model_for_training

    model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=int8mm.Int8MMConfig(threshold=6.0))
    return prepare_model_for_training(model, use_gradient_checkpointing=False)


def add_lora(name: str, model):
    from peft import LoraConfig

    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(0)  # the same initial adapter on every base
    if name == "int8mm":
        from int8mm.integrations.peft import get_peft_model
    else:
        from peft import get_peft_model
    return get_peft_model(model, config)


def held_out_loss(model, windows: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return statistics.fmean(model(input_ids=w[None], labels=w[None]).loss.item() for w in windows)


def run_one(name: str, args) -> dict:
    from transformers import AutoTokenizer

    from int8mm import assets

    torch.manual_seed(0)
    checkpoint = assets.smollm2_checkpoint()
    ids = torch.tensor(AutoTokenizer.from_pretrained(checkpoint)(assets.sotu_text(1990))["input_ids"])
    train_tokens = args.steps * args.batch * args.seq_len
    needed = HELD_OUT_OFFSET + HELD_OUT_WINDOWS * args.seq_len
    if train_tokens > HELD_OUT_OFFSET or needed > ids.numel():
        raise SystemExit(f"{train_tokens} training tokens and {needed} in all do not fit the text ({ids.numel()})")
    train = ids[:train_tokens].view(args.steps, args.batch, args.seq_len)
    held_out = ids[HELD_OUT_OFFSET:needed].view(HELD_OUT_WINDOWS, args.seq_len)

    model = add_lora(name, load_base(name, checkpoint))
    before = held_out_loss(model, held_out)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    step_seconds, losses = [], []
    model.train()
    with PeakRss() as rss:
        start_rss = rss.peak
        for batch in train:
            start = time.perf_counter()
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step_seconds.append(time.perf_counter() - start)
            losses.append(loss.item())
            print(f"{name} step {len(losses)}/{args.steps}: loss {losses[-1]:.4f}, {step_seconds[-1]:.1f} s",
                  file=sys.stderr, flush=True)
    after = held_out_loss(model, held_out)
    merged = held_out_loss(model.merge_and_unload(), held_out)
    return {"base": name, "label": BASES[name], "held_out_before": before, "held_out_after": after,
            "held_out_merged": merged, "train_losses": losses, "median_step_s": statistics.median(step_seconds),
            "total_train_s": sum(step_seconds), "peak_train_rss_mib": (rss.peak - start_rss) / 2**20}


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"# LoRA on SmolLM2-135M-Instruct: fp32 vs bitsandbytes vs int8mm ({result['meta']['date']})", "",
             f"- {s['steps']} AdamW steps (lr {s['lr']}), batch {s['batch']} x {s['seq_len']} tokens; LoRA r=8, "
             f"alpha 16, q_proj + v_proj; held-out loss = mean over {HELD_OUT_WINDOWS} windows of {s['seq_len']} "
             f"tokens", f"- {result['meta']['device']}; torch {result['meta']['torch']}, transformers "
             f"{result['meta']['transformers']}, peft {result['meta']['peft']}, bitsandbytes "
             f"{result['meta']['bitsandbytes']}, int8mm {result['meta']['int8mm']}; each base in its own process",
             "", "| base | held-out loss before | after training | after merge_and_unload | s / step (median) | "
             "peak RSS while training (MiB above start) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['held_out_before']:.4f} | {r['held_out_after']:.4f} | {r['held_out_merged']:.4f} "
              f"| {r['median_step_s']:.2f} | {r['peak_train_rss_mib']:.0f} |" for r in result["rows"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_script_arguments(parser, args, {"steps": 1, "seq_len": 1, "batch": 1})
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.only:
        print(json.dumps(run_one(args.only, args)))
        return
    from int8mm.bench.environment import package_version, run_metadata

    rows = []
    for name in BASES:  # one process per base: its peak memory and allocator state are its own
        cmd = [sys.executable, __file__, "--only", name, "--steps", str(args.steps), "--seq-len", str(args.seq_len),
               "--batch", str(args.batch), "--lr", str(args.lr)]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    meta = run_metadata(torch.device("cpu"))
    meta.update({"peft": package_version("peft"), "transformers": package_version("transformers"),
                 "bitsandbytes": package_version("bitsandbytes")})
    result = {"meta": meta, "settings": {"steps": args.steps, "seq_len": args.seq_len, "batch": args.batch,
                                         "lr": args.lr}, "rows": rows}
    report = markdown(result)
    print(report)
    if args.out:
        paths = write_json_and_markdown(result, report, args.out, "lora_smollm2")
        print("wrote", paths["json"], paths["md"])


if __name__ == "__main__":
    main()
