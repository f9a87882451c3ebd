"""``python -m int8mm.demo``: quantize a small random Llama and compare it with the float model.

The model is built from a config (random weights, nothing downloaded). A few hidden dimensions of every
input norm are scaled up so that, as in large trained models, some activation features are outliers;
LLM.int8() keeps those columns in floating point (threshold 6.0), while threshold 0 quantizes them too.
Needs ``transformers`` (installed with the ``test`` extra).
"""
import copy
import statistics
import time

import torch

import int8mm

SEED = 0
TOKENS = 64  # one prompt of 64 tokens
OUTLIER_DIMS = (7, 100, 300)
OUTLIER_SCALE = 30.0
TIMED_RUNS = 5


def build_model():
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as exc:  # pragma: no cover - the demo's one extra dependency
        raise SystemExit(f"the demo needs transformers (pip install -e '.[test]'): {exc}") from None
    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=False)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[list(OUTLIER_DIMS)] = OUTLIER_SCALE
    return model


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes held by parameters and buffers (shared tensors counted once)."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def time_forward(model, ids) -> float:
    model(ids)  # warm-up
    samples = []
    for _ in range(TIMED_RUNS):
        start = time.perf_counter()
        model(ids)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    model = build_model()
    ids = torch.randint(0, model.config.vocab_size, (1, TOKENS), generator=torch.Generator().manual_seed(SEED))
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    print(f"int8mm {int8mm.__version__} demo: random Llama ({model.config.num_hidden_layers} layers, hidden "
          f"{model.config.hidden_size}, {n_linear} Linear layers), one prompt of {TOKENS} tokens, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, backends here: "
          f"{', '.join(b.value for b in int8mm.available_backends('cpu'))}")
    print(f"outlier features: hidden dims {list(OUTLIER_DIMS)} of every input norm scaled by {OUTLIER_SCALE:g}\n")

    rows = []
    with torch.inference_mode():
        reference = model(ids).logits.float()
        float_bytes = model_bytes(model)
        rows.append(("float32", float_bytes, 0.0, 0.0, 100.0, time_forward(model, ids)))
        for threshold in (6.0, 0.0):
            quantized = int8mm.quantize_model(copy.deepcopy(model), threshold=threshold)  # lm_head stays float
            logits = quantized(ids).logits.float()
            diff = (logits - reference).abs()
            agree = 100.0 * float((logits.argmax(-1) == reference.argmax(-1)).float().mean())
            rows.append((f"int8, threshold {threshold:g}", model_bytes(quantized), float(diff.max()),
                         float(diff.mean()), agree, time_forward(quantized, ids)))

    header = ("model", "param+buffer MiB", "max |logit diff|", "mean |logit diff|", "top-1 agree %", "ms/forward")
    print(f"{header[0]:<22}" + "".join(f"{h:>20}" for h in header[1:]))
    for name, nbytes, max_diff, mean_diff, agree, seconds in rows:
        print(f"{name:<22}{nbytes / 2**20:>20.2f}{max_diff:>20.4f}{mean_diff:>20.5f}{agree:>20.1f}"
              f"{1e3 * seconds:>20.1f}")
    swapped = [m for m in quantized.modules() if isinstance(m, int8mm.Int8Linear)]
    float_linear = sum(4 * m.in_features * m.out_features for m in swapped)
    int8_linear = sum(m.weight.numel() + m.SCB.numel() * m.SCB.element_size() for m in swapped)
    print(f"\nthe {len(swapped)} swapped Linear weights: {float_linear / 2**20:.2f} MiB float32 "
          f"({float_linear / 2**21:.2f} MiB as fp16) -> {int8_linear / 2**20:.2f} MiB int8 + fp32 row scales; "
          f"embeddings and lm_head stay float32")
    print(f"float logits: max |logit| {float(reference.abs().max()):.3f}, mean {float(reference.abs().mean()):.4f}")


if __name__ == "__main__":
    main()
