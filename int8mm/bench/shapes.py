"""Linear-layer shapes named by their role in real models (K -> N, nn.Linear layout [N, K])."""
from dataclasses import dataclass


@dataclass(frozen=True)
class LayerShape:
    model: str
    role: str
    k: int  # in_features
    n: int  # out_features

    @property
    def name(self) -> str:
        return f"{self.model} {self.role}"


def _llama(model, hidden, intermediate, kv_dim):
    return [
        LayerShape(model, "qkv_proj", hidden, hidden + 2 * kv_dim),
        LayerShape(model, "o_proj", hidden, hidden),
        LayerShape(model, "gate_up_proj", hidden, 2 * intermediate),
        LayerShape(model, "down_proj", intermediate, hidden),
    ]


LAYER_SHAPES = {
    "Llama-3-8B": _llama("Llama-3-8B", 4096, 14336, 1024),
    "Llama-3-70B": _llama("Llama-3-70B", 8192, 28672, 1024),
    "OPT-6.7B": [
        LayerShape("OPT-6.7B", "qkv_proj", 4096, 3 * 4096),
        LayerShape("OPT-6.7B", "out_proj", 4096, 4096),
        LayerShape("OPT-6.7B", "fc1", 4096, 16384),
        LayerShape("OPT-6.7B", "fc2", 16384, 4096),
    ],
    "SmolLM2-135M": _llama("SmolLM2-135M", 576, 1536, 192),
}
