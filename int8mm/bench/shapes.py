"""Linear-layer shapes named by their role in real models (K -> N, nn.Linear layout [N, K])."""
from dataclasses import dataclass


@dataclass(frozen=True)
class LayerShape:
    """One nn.Linear of a real model: ``y[M, n] = x[M, k] @ W[n, k].T``."""

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


# rows per call: decode (1), small-batch decode (16), then prefill chunks
M_VALUES = (1, 16, 128, 512, 2048)
# at most this many rows a call reads weights like a GEMV (the Triton backend's decode path too)
DECODE_MAX_M = 16


def regime(m: int) -> str:
    """``"decode"`` (bound by weight bytes) for M <= DECODE_MAX_M, else ``"prefill"`` (bound by ops)."""
    return "decode" if m <= DECODE_MAX_M else "prefill"


def select_shapes(models, roles=None) -> list[LayerShape]:
    """The shapes of ``models`` (names of LAYER_SHAPES), optionally only the given ``roles``.

    Raises:
        ValueError: an unknown model or a role none of the models has, quoting the name and the choices.
    """
    shapes = []
    for model in models:
        if model not in LAYER_SHAPES:
            raise ValueError(f"unknown model {model!r}; choose from {', '.join(LAYER_SHAPES)}")
        shapes += LAYER_SHAPES[model]
    if roles:
        known = {s.role for s in shapes}
        for role in roles:
            if role not in known:
                raise ValueError(f"no shape has role {role!r}; the roles are {', '.join(sorted(known))}")
        shapes = [s for s in shapes if s.role in roles]
    return shapes
