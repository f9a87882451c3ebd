"""Swapping layers on the meta device: the layers ``int8mm.selection`` picks become empty ``Int8Linear``."""
from torch import nn

from ..config import Int8MMConfig
from ..model import empty_int8_layer
from ..nn import Int8Linear
from ..selection import Selection, select_layers


def replace_linears_on_meta(
    model: nn.Module,
    config: Int8MMConfig,
    linear_cls: type[Int8Linear] = Int8Linear,
) -> tuple[dict[str, bool], Selection]:
    """Swap each layer that ``int8mm.selection`` picks for an empty ``linear_cls`` on meta. No weight is read.

    Args:
        model: a model whose layers may still be on the meta device.
        config: threshold and backend of every new layer, and what to skip.
        linear_cls: ``Int8Linear`` or a subclass.
    Returns:
        ``({qualified name: transposed}, selection)``; ``transposed`` is True for a ``Conv1D``, whose checkpoint
        weight is ``[in, out]`` (the transpose of an ``nn.Linear`` weight). Every alias of a layer is listed.
    """
    selection = select_layers(model, config)
    transposed: dict[str, bool] = {}
    for layer in selection.quantize:
        replacement = empty_int8_layer(layer, config, linear_cls)
        for name in layer.names:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, replacement)
            transposed[name] = layer.is_conv1d
    return transposed, selection
