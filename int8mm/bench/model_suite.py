"""The model-level suite: prefill latency, decode tokens/s and memory of a causal LM, float vs 8-bit.

A Llama-3-8B-shaped model with random weights stands in where no real checkpoint is at hand; a few hidden
dimensions of every input norm are scaled up so that, as in large trained models, some activation
features are outliers and LLM.int8()'s decomposition runs. Providers: the float model, bitsandbytes'
``Linear8bitLt`` swapped in for every Linear but ``lm_head``, and int8mm's ``quantize_model``.

Each measurement goes through transformers' ``generate`` (greedy, a fixed number of new tokens, after a
full-length warm-up): prefill = ``generate`` of 1 token; decode step = (``generate`` of N tokens minus
``generate`` of 1) / (N - 1). On a GPU the float and int8mm models are also timed with a static KV cache,
which makes ``generate`` compile the decode step with CUDA graphs, so the kernels rather than Python set
the pace; bitsandbytes cannot be captured (its outlier path syncs with the host) and runs eager only.
"""
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
from tqdm.auto import tqdm

from .._constants import DEFAULT_THRESHOLD
from ..model import DEFAULT_SKIP_MODULES, matches_skip, quantize_model
from .environment import run_metadata
from .memory import module_bytes
from .providers import bitsandbytes_missing
from .report import format_rate, markdown_table

# LlamaConfig fields of each preset; "tiny" runs in seconds on CPU
PRESETS = {
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
    "tiny": dict(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}
PROVIDERS = ("float", "bnb", "int8mm")
EAGER, STATIC = "eager", "static cache + CUDA graphs"
ERROR_CHARS = 500  # of a failed run's error, kept in its row


@dataclass(frozen=True)
class ModelSuiteConfig:
    preset: str = "llama-3-8b"
    layers: int | None = None  # overrides the preset's num_hidden_layers
    prompt_tokens: int = 512
    new_tokens: int = 64
    batch_sizes: tuple[int, ...] = (1, 8)
    providers: tuple[str, ...] = PROVIDERS
    threshold: float = DEFAULT_THRESHOLD
    outlier_dims: tuple[int, ...] = (7, 100, 300, 1000, 2000, 3000)
    outlier_scale: float = 40.0  # docs/BASELINES.md's end-to-end run scaled 6 norm dims by 40
    timed_runs: int = 3
    seed: int = 0

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"unknown model preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        for provider in self.providers:
            if provider not in PROVIDERS:
                raise ValueError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")
        if self.new_tokens < 2 or self.prompt_tokens < 1 or self.timed_runs < 1:
            raise ValueError(f"need new_tokens >= 2, prompt_tokens >= 1, timed_runs >= 1; got {self.new_tokens}, "
                             f"{self.prompt_tokens}, {self.timed_runs}")
        if self.layers is not None and self.layers < 1:
            raise ValueError(f"layers must be >= 1 (None: the preset's), got {self.layers}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch_sizes must be positive, got {self.batch_sizes}")


def default_model_config(device: torch.device, quick: bool = False, **overrides) -> ModelSuiteConfig:
    """Llama-3-8B-shaped on a GPU (2 layers when ``quick``); a tiny model on CPU."""
    if device.type == "cuda":
        config = ModelSuiteConfig(layers=2 if quick else None)
    else:
        config = ModelSuiteConfig(preset="tiny", prompt_tokens=32 if quick else 128, new_tokens=8 if quick else 32,
                                  batch_sizes=(1, 4), timed_runs=1 if quick else 3)
    return replace(config, **overrides)


def build_model(config: ModelSuiteConfig, device: torch.device, dtype: torch.dtype):
    """A random-weight Llama of the preset's shape, in ``dtype`` on ``device``, with planted outlier features."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    fields = dict(PRESETS[config.preset], tie_word_embeddings=False)
    if config.layers is not None:
        fields["num_hidden_layers"] = config.layers
    llama = LlamaConfig(max_position_embeddings=config.prompt_tokens + config.new_tokens, **fields)
    torch.manual_seed(config.seed)  # every provider starts from the same weights
    with torch.device(device):  # initialise on the device: an 8B model drawn on CPU takes minutes
        model = AutoModelForCausalLM.from_config(llama, dtype=dtype).eval()
    dims = planted_dims(config)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[dims] = config.outlier_scale
    model.generation_config.eos_token_id = None  # random weights may emit "EOS"; always generate N tokens
    model.generation_config.pad_token_id = 0
    return model


def planted_dims(config: ModelSuiteConfig) -> list[int]:
    """The outlier dimensions that exist in the preset's hidden size."""
    return [d for d in config.outlier_dims if d < PRESETS[config.preset]["hidden_size"]]


def swap_to_bitsandbytes(model: torch.nn.Module, threshold: float, skip_modules=DEFAULT_SKIP_MODULES):
    """Replace every ``nn.Linear`` (but ``skip_modules``) by bitsandbytes' ``Linear8bitLt``, in place."""
    import bitsandbytes as bnb

    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name
               and not matches_skip(name, skip_modules)]
    for name, linear in targets:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False, threshold=threshold)
        # Int8Params quantize when moved from the CPU to the device
        layer.weight = bnb.nn.Int8Params(linear.weight.detach().cpu(), requires_grad=False, has_fp16_weights=False)
        if linear.bias is not None:
            layer.bias = torch.nn.Parameter(linear.bias.detach().cpu(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.to(linear.weight.device))
    return model


def prepare(provider: str, model, threshold: float):
    if provider == "bnb":
        return swap_to_bitsandbytes(model, threshold)
    if provider == "int8mm":
        return quantize_model(model, threshold=threshold)
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generate_seconds(model, ids, new_tokens: int, static: bool) -> float:
    kwargs = {"cache_implementation": "static"} if static else {"disable_compile": True}
    _sync(ids.device)
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, **kwargs)
    _sync(ids.device)
    return time.perf_counter() - start


def measure(model, config: ModelSuiteConfig, batch: int, static: bool) -> dict:
    """Median prefill seconds and decode tokens/s at ``batch`` sequences of ``prompt_tokens``."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(config.seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, config.prompt_tokens), generator=generator).to(device)
    _generate_seconds(model, ids, config.new_tokens, static)  # warm-up at full length: compiles, sizes the cache
    prefill, full = [], []
    for _ in range(config.timed_runs):
        prefill.append(_generate_seconds(model, ids, 1, static))
        full.append(_generate_seconds(model, ids, config.new_tokens, static))
    prefill_s, full_s = sorted(prefill)[len(prefill) // 2], sorted(full)[len(full) // 2]
    step_s = (full_s - prefill_s) / (config.new_tokens - 1)
    # a noisy host can make the long run no slower than the short one: no figure rather than a wrong one
    return {"prefill_ms": 1e3 * prefill_s, "decode_tokens_per_s": batch / step_s if step_s > 0 else None}


def run_model_suite(config: ModelSuiteConfig, device: torch.device, progress: bool = True,
                    checkpoint: Callable[[dict], None] | None = None) -> dict:
    """Rows per (provider, mode, batch) with prefill ms, decode tokens/s, weight bytes and peak GPU memory.

    ``checkpoint``, if given, receives the result so far after every run (``meta["runs"]``: how many were
    measured, of how many planned), for a caller that saves it before a time limit can cut the suite short."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    meta = {**run_metadata(device), "config": asdict(config), "dtype": str(dtype).removeprefix("torch.")}
    meta["outlier_dims_used"] = planted_dims(config)
    providers, meta["skipped"] = measurable_providers(config.providers)
    modes = {provider: _modes(provider, device) for provider in providers}
    rows = []
    total = sum(len(m) for m in modes.values()) * len(config.batch_sizes)
    bar = tqdm(total=total, desc="model suite", unit="run", disable=not progress)
    with torch.inference_mode():
        for provider in providers:
            try:
                model = prepare(provider, build_model(config, device, dtype), config.threshold)
                weights, not_prepared = module_bytes(model), None
            except Exception as error:  # noqa: BLE001  a provider that cannot be built costs only its own rows
                model, weights = None, None
                not_prepared = f"preparing the model: {type(error).__name__}: {error}"
            for mode in modes[provider]:
                for batch in config.batch_sizes:
                    bar.set_postfix_str(f"{provider} {mode} batch {batch}")
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    if not_prepared is not None:  # each of its runs is a row with the error
                        figures = _failed(not_prepared)
                    else:
                        try:
                            figures = measure(model, config, batch, static=mode == STATIC)
                        except Exception as error:  # noqa: BLE001  one failed run must not cost the others' rows
                            figures = _failed(f"{type(error).__name__}: {error}")
                    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
                    rows.append({"device": meta["device"], "date": meta["date"], "provider": _label(provider, config),
                                 "mode": mode, "batch": batch, "prompt_tokens": config.prompt_tokens,
                                 "new_tokens": config.new_tokens, **figures, "weights_bytes": weights,
                                 "peak_bytes": None if "error" in figures else peak})
                    # each run's figures as soon as they exist: a run stopped at a time limit still leaves them
                    if progress:
                        bar.write(_row_line(rows[-1]))
                    bar.update()
                    if checkpoint is not None:
                        checkpoint(_result_so_far(meta, rows, total))
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    bar.close()
    return _result_so_far(meta, rows, total)


def _result_so_far(meta: dict, rows: list[dict], planned: int) -> dict:
    return {"meta": {**meta, "runs": {"measured": len(rows), "planned": planned}}, "rows": list(rows)}


def _failed(why: str) -> dict:
    """The figures of a run that raised: none, and why."""
    return {"prefill_ms": None, "decode_tokens_per_s": None, "error": why[:ERROR_CHARS]}


def measurable_providers(providers: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """``(providers that can run here, "name: why" for the others)``: as the kernel suite does, bitsandbytes missing
    is reported as not measured, rather than failing after the other providers were measured."""
    why_not = bitsandbytes_missing() if "bnb" in providers else None
    if why_not is None:
        return list(providers), []
    return [p for p in providers if p != "bnb"], [f"bnb Linear8bitLt: {why_not}"]


def _modes(provider: str, device: torch.device) -> list[str]:
    """Eager everywhere; on CUDA also a static cache with compiled decode, except for bitsandbytes, whose
    outlier path synchronises with the host and so cannot be captured in a CUDA graph."""
    if device.type == "cuda" and provider != "bnb":
        return [EAGER, STATIC]
    return [EAGER]


def _label(provider: str, config: ModelSuiteConfig) -> str:
    t = f"{config.threshold:g}"
    return {"float": "float", "bnb": f"bnb Linear8bitLt t={t}", "int8mm": f"int8mm t={t}"}[provider]


def _decode_figure(row: dict) -> str:
    """Decode tokens/s as the reports print it ("-" where the run gave no figure)."""
    return "-" if row["decode_tokens_per_s"] is None else f"{row['decode_tokens_per_s']:.1f}"


def _prefill_figure(row: dict) -> str:
    return "-" if row["prefill_ms"] is None else f"{row['prefill_ms']:.1f} ms"


def _row_line(row: dict) -> str:
    if "error" in row:
        return f"{row['provider']} {row['mode']} batch {row['batch']}: FAILED: {row['error']}"
    peak = "" if row["peak_bytes"] is None else f", peak {format_rate(row['peak_bytes'], 'B')}"
    return (f"{row['provider']} {row['mode']} batch {row['batch']}: prefill {_prefill_figure(row)}, "
            f"decode {_decode_figure(row)} tokens/s{peak}")


def model_markdown(result: dict) -> str:
    meta, rows = result["meta"], result["rows"]
    c = meta["config"]
    layers = "all" if c["layers"] is None else c["layers"]
    lines = [f"# int8mm model benchmark: {meta['device']}, {meta['date']}", "",
             f"- model: {c['preset']}-shaped Llama, random weights ({layers} layers), "
             f"{meta['dtype']}, hidden dims {meta['outlier_dims_used']} of every input norm scaled "
             f"x{c['outlier_scale']:g}",
             f"- prompt {c['prompt_tokens']} tokens, {c['new_tokens']} new tokens, greedy; prefill = generate(1 "
             f"token); decode = (generate(N) - generate(1)) / (N - 1); median of {c['timed_runs']} after a warm-up",
             f"- versions: torch {meta['torch']}, transformers {meta['transformers']}, bitsandbytes "
             f"{meta['bitsandbytes']}, int8mm {meta['int8mm']}"]
    runs = meta.get("runs", {})
    if runs and runs["measured"] < runs["planned"]:
        lines.append(f"- PARTIAL: {runs['measured']} of the {runs['planned']} runs measured (the suite was cut "
                     f"short, or is still running)")
    lines += [f"- not measured: {note}" for note in meta.get("skipped", [])] + [""]
    body = []
    for r in rows:
        peak = "-" if r["peak_bytes"] is None else format_rate(r["peak_bytes"], "B")
        body.append([r["provider"], r["mode"], str(r["batch"]), _prefill_figure(r), _decode_figure(r),
                     "-" if r["weights_bytes"] is None else format_rate(r["weights_bytes"], "B"), peak])
    header = ["provider", "mode", "batch", "prefill", "decode tokens/s", "weights", "peak GPU memory"]
    lines += markdown_table(header, body)
    failed = [r for r in rows if "error" in r]
    if failed:
        lines += ["", "Failed runs (no figures):", ""] + [f"- {_row_line(r)}" for r in failed]
    return "\n".join(lines) + "\n"
