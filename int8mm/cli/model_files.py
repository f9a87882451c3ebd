"""What a checkpoint directory holds, read before any weight is: its model class (config.json's
``architectures``), whether it has a language-model head, its tokenizer and vocabulary.

The commands load the class the checkpoint names, so ``int8mm quantize`` saves a ``BertModel`` as a
``BertModel`` (not a ``BertLMHeadModel`` with a random head), and refuse what they cannot do in one line.
"""
import json
from pathlib import Path

from .common import CliError, one_line

# files that hold a tokenizer's vocabulary (one is enough; tokenizer_config.json alone is not a tokenizer)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tekken.json")


def read_config(path: Path) -> dict:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read {str(path / 'config.json')!r}: {exc}") from None
    if not isinstance(config, dict):
        raise CliError(f"{str(path / 'config.json')!r} is not a JSON object")
    return config


def quantization_method(path: Path) -> str | None:
    """The ``quant_method`` of config.json's ``quantization_config`` (None: the checkpoint is in full precision)."""
    config = read_config(path)
    for section in (config, config.get("text_config")):  # a multimodal model keeps its language model's apart
        entry = section.get("quantization_config") if isinstance(section, dict) else None
        if entry:
            return str(entry.get("quant_method", "unknown")) if isinstance(entry, dict) else "unknown"
    return None


def check_full_precision(path: Path, argument: str, why: str) -> None:
    """``path`` is not a quantized checkpoint (else a CliError naming ``argument`` and ``why`` that matters)."""
    method = quantization_method(path)
    if method is not None:
        raise CliError(f"{argument} {str(path)!r} is already quantized (config.json has a {method!r} "
                       f"quantization_config): {why}")


def model_class(path: Path, need_lm_head: bool):
    """The transformers class config.json names (``architectures[0]``).

    Raises:
        CliError: no ``architectures``, a class this transformers lacks, or (``need_lm_head``) a class that is not
            a causal language model.
    """
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architectures = read_config(path).get("architectures") or []
    if not isinstance(architectures, list) or not architectures or not isinstance(architectures[0], str):
        raise CliError(f"{str(path / 'config.json')!r} names no model class ('architectures'), so which model it "
                       f"holds is unknown")
    name = architectures[0]
    cls = getattr(transformers, name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise CliError(f"{str(path / 'config.json')!r} names the model class {name!r}, which transformers "
                       f"{transformers.__version__} does not have")
    if need_lm_head and name not in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        raise CliError(f"{path} holds a {name}, which has no language-model head: perplexity needs a causal LM "
                       f"(a *ForCausalLM checkpoint)")
    return cls


def skeleton(path: Path):
    """The model class config.json names, built on the meta device: its module names, no weight read.

    Raises:
        CliError: as ``model_class``, or a config.json transformers cannot read.
    """
    import transformers
    from accelerate import init_empty_weights

    cls = model_class(path, need_lm_head=False)
    config = transformers_config(path)
    with init_empty_weights():
        return cls._from_config(config)


def _invalid_value_errors() -> tuple[type[Exception], ...]:
    """What building a config from JSON of the wrong shape raises: huggingface_hub's strict dataclass checks (a
    value of the wrong type, num_attention_heads not dividing hidden_size) and plain TypeError/ValueError."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # a huggingface_hub without strict dataclasses: transformers' own checks only
        return (TypeError, ValueError, KeyError)
    return (TypeError, ValueError, KeyError, StrictDataclassError)


def transformers_config(path: Path):
    """config.json of ``path`` as transformers reads it.

    Raises:
        CliError: naming config.json, with the whole reason (the first line of a validation error ends in a colon).
    """
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, *_invalid_value_errors()) as exc:
        raise CliError(f"cannot read {str(path / 'config.json')!r}: {one_line(exc)}") from None


def check_generation_config(path: Path, cls) -> None:
    """The generation_config.json of ``path``, if any, is one transformers can read, where ``cls`` reads it
    (a model that can generate): ``from_pretrained`` raises on a JSON array or a value of the wrong type in it. A
    file that is not JSON passes: ``from_pretrained`` then takes the settings config.json holds, as it does here.

    Raises:
        CliError: naming generation_config.json, with the whole reason.
    """
    file = path / "generation_config.json"
    can_generate = getattr(cls, "can_generate", None)
    if not file.is_file() or not (callable(can_generate) and can_generate()):
        return
    from transformers import GenerationConfig

    try:
        GenerationConfig.from_pretrained(path, local_files_only=True)
    except OSError:  # not JSON: from_pretrained falls back to config.json
        return
    except (AttributeError, *_invalid_value_errors()) as exc:
        raise CliError(f"cannot read {str(file)!r} as a generation config: {type(exc).__name__}: "
                       f"{one_line(exc)}") from None


def check_configs(path: Path, cls) -> None:
    """config.json and generation_config.json of ``path`` read as ``cls.from_pretrained`` reads them, before any
    weight is: an invalid value in either was a failure of the catch-all (exit 1) with only the message's first
    line, which ends in a colon."""
    transformers_config(path)
    check_generation_config(path, cls)


def tokenizer(path: Path):
    """The tokenizer stored in ``path`` itself (never one found elsewhere, e.g. by the config's name).

    Raises:
        CliError: ``path`` holds no tokenizer files, or transformers cannot read them.
    """
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CliError(f"{path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save the tokenizer "
                       f"next to the model (tokenizer.save_pretrained)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CliError(f"cannot load the tokenizer of {path}: {one_line(exc)}") from None


def text_config(path: Path):
    """The transformers config of the language model in ``path`` (a multimodal model's text part), read before any
    weight is."""
    config = transformers_config(path)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def max_positions(path: Path) -> int | None:
    """The longest input the model takes (max_position_embeddings; GPT-2's n_positions); None if it names none."""
    limit = getattr(text_config(path), "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def check_vocabulary(path: Path, tok) -> None:
    """The model's embedding covers every id the tokenizer can produce (else the forward indexes past it)."""
    model_vocab = getattr(text_config(path), "vocab_size", None)
    if isinstance(model_vocab, int) and model_vocab < len(tok):
        raise CliError(f"{path}: the model's vocabulary ({model_vocab} tokens, config.json vocab_size) is smaller "
                       f"than its tokenizer's ({len(tok)}): token ids >= {model_vocab} have no embedding")
