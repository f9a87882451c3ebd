"""Checkpoint keys as transformers 5 reads them: it renames some while loading (and ``save_pretrained`` writes the
old names back), so ``load_in_8bit``, which matches the files' keys to the model's, must rename them the same way.

Examples (``transformers/conversion_mapping.py``): GPT-NeoX's ``embed_out.`` is the model's ``lm_head.``; every
model reads the old ``LayerNorm.gamma`` / ``beta`` as ``weight`` / ``bias``; multimodal Gemma-3 and the other
llava-style models move ``language_model.model.`` under ``model.language_model.``. Without these, every Pythia
checkpoint, and the 8-bit checkpoints int8mm itself saves of those models, failed to load with "lacks tensors".

A conversion that merges tensors (a mixture of experts' per-expert weights fused into one 3-D parameter) is more
than a rename: ``load_in_8bit`` refuses such a checkpoint up front, naming the way that loads it.
"""
import sys

from torch import nn

from ..errors import CheckpointError
from .safetensors_files import HeaderEntry


def renamed_as_transformers_loads(headers: dict[str, HeaderEntry], model: nn.Module) -> dict[str, HeaderEntry]:
    """``headers`` under the keys transformers would load them as into ``model`` (a transformers model; any other
    model, or a transformers version without load-time conversions, gets ``headers`` back unchanged).

    Raises:
        CheckpointError: transformers would merge or split some of the tensors (not a rename).
    """
    transformers = sys.modules.get("transformers")  # a model can only be a transformers model if it was imported
    if transformers is None or not isinstance(model, transformers.PreTrainedModel):
        return headers
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key
    except ImportError:  # transformers 4 renames nothing beyond the base-model prefix, which load_in_8bit handles
        return headers
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    if not renamings and not converters:
        return headers
    known = _model_keys(model)
    renamed, converted = {}, []
    for key in sorted(headers, key=dot_natural_key):  # transformers' order: some renamings depend on it
        entry = headers[key]
        new_key, converter_pattern = rename_source_key(key, renamings, converters)
        if converter_pattern is not None:
            converted.append(key)
            continue
        if new_key != key and new_key not in known and key in known:  # as transformers: a key the model has as is
            new_key = key
        if new_key in renamed:  # both the old name and the new one in the file: which to load is anyone's guess
            raise CheckpointError(f"{entry.path}: {key!r} and {renamed[new_key].stored_key or new_key!r} are both "
                                  f"{new_key!r} to transformers, which renames keys as it loads them")
        renamed[new_key] = entry if new_key == key else entry.renamed(new_key)
    if converted:
        first = headers[converted[0]]
        raise CheckpointError(
            f"{first.path}: transformers converts {len(converted)} of this checkpoint's tensors as it loads them "
            f"(such as {converted[0]!r}: it merges tensors, as for a mixture of experts' fused weights), which "
            f"load_in_8bit does not do. Load a float checkpoint with from_pretrained(path, quantization_config="
            f"int8mm.Int8MMConfig()) and one saved by int8mm with from_pretrained(path); a bitsandbytes checkpoint "
            f"of this model loads with transformers and bitsandbytes only")
    return renamed


def _model_keys(model: nn.Module) -> set[str]:
    """The model's state-dict keys, also as a base model's checkpoint names them (without ``base_model_prefix``)
    and as a head model's does (with it): load_in_8bit aligns that prefix after renaming."""
    keys = set(model.state_dict(keep_vars=True))
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix:
        keys |= {key[len(prefix) + 1:] for key in keys if key.startswith(prefix + ".")}
        keys |= {f"{prefix}.{key}" for key in keys}
    return keys
