"""The ``int8mm`` command, in process through ``main(argv)`` (and once through ``python -m``).

eval and quantize run on a tiny random Llama saved with ``save_pretrained`` next to a word-level tokenizer
built with the ``tokenizers`` library; the demo runs on the real embedded SmolLM2-135M with a tiny budget.
"""
import json
import re
import subprocess
import sys

import pytest
import torch

import int8mm
from helpers import torch_threads
from int8mm.cli import main

WORDS = "the state of our union is strong and we will work together for a better future".split()
TEXT = " ".join(WORDS * 6)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(WORDS))}}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<unk>")
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # two outlier features, so the 8-bit model takes the decomposition path
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 40]] = 30.0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err: str) -> list[str]:
    """stderr without the progress bars of model loading."""
    return [line for line in err.splitlines() if line.strip() and "%|" not in line]


def perplexities(out: str) -> list[float]:
    return [float(v) for v in re.findall(r"\| (\d+\.\d+) \([+-]", out)]


@pytest.mark.parametrize("command", ["demo", "bench", "eval", "quantize", "info"])
def test_every_subcommand_has_help(capsys, command):
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0
    assert out.startswith(f"usage: int8mm {command}")


def test_info_lists_versions_devices_and_backends(capsys):
    code, out, _ = run_cli(capsys, "info")
    assert code == 0
    assert f"| int8mm | {int8mm.__version__} |" in out
    assert f"| torch | {torch.__version__} |" in out
    assert re.search(r"^\| cpu \| .* \| reference", out, re.M), out


def test_info_says_when_the_default_backend_cannot_run(capsys, monkeypatch):
    monkeypatch.setenv("INT8MM_BACKEND", "triton")
    monkeypatch.setattr("int8mm.cli.info.available_backends", lambda device: [int8mm.Backend.REFERENCE])
    code, out, _ = run_cli(capsys, "info")  # it said "triton (INT8MM_BACKEND set)", and every op then refused it
    assert code == 0 and "default backend: triton (INT8MM_BACKEND set), which cannot run on cpu" in out, out
    monkeypatch.setenv("INT8MM_BACKEND", "reference")
    _, out, _ = run_cli(capsys, "info")
    assert "default backend: reference (INT8MM_BACKEND set)\n" in out


def test_info_says_why_a_gpu_backend_is_not_used(capsys, monkeypatch):
    """A T4 (sm_75) and a Triton older than 3.4: neither GPU backend runs, and info says why rather than only
    listing 'reference' for the GPU."""
    from types import SimpleNamespace

    from int8mm import backends

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: SimpleNamespace(name="Tesla T4", major=7, minor=5, total_memory=15 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    monkeypatch.setattr(backends, "_cuda_devices_present", lambda: True)
    monkeypatch.setattr(backends, "_TRITON_INSTALLED", False)
    monkeypatch.setattr(backends, "_TRITON_OLD_VERSION", "3.1.0")
    backends._compute_capability.cache_clear()
    try:
        code, out, _ = run_cli(capsys, "info")
    finally:
        backends._compute_capability.cache_clear()
    assert code == 0
    assert "| cuda:0 | Tesla T4, sm_75, 15 GiB | reference |" in out, out
    assert ("note: Triton 3.1.0 is older than the 3.4 int8mm's kernels need: the triton backend is not used (Triton "
            ">= 3.4 pairs with torch >= 2.8)") in out, out
    assert ("note: cuda:0 (sm_75): its int8 kernels need an NVIDIA GPU of compute capability 8.0 or newer; only the "
            "reference backend runs there") in out, out


def test_eval_compares_full_precision_and_8bit(capsys, tiny_checkpoint, text_file):
    code, out, err = run_cli(capsys, "eval", tiny_checkpoint, "--text", text_file, "--window", "32",
                             "--new-tokens", "3", "--prompt", "the state")
    assert code == 0, err
    assert "full precision (float32)" in out and "int8mm 8-bit (threshold 6)" in out
    # the text's 96, not --max-tokens' 8192; three windows of 32 predict 31 each
    assert "perplexity of the first 96 tokens in windows of 32 (93 predicted)" in out
    full, eight_bit = perplexities(out)
    assert 1.0 < full < 1000 and 1.0 < eight_bit < 1000
    assert abs(eight_bit / full - 1) < 0.05, (full, eight_bit)  # 8-bit barely moves a random model's perplexity
    assert re.search(r"int8mm 8-bit \(threshold 6\) \| [\d.]+ MiB \([\d.]+x\) \| 14 \|", out), out  # 7 per layer
    assert out.count("greedy continuation") == 1


def test_eval_keeps_an_output_head_not_named_lm_head(capsys, monkeypatch, tiny_checkpoint, tmp_path, text_file):
    """eval quantizes as quantize and from_pretrained do: the model's output head stays float whatever its name.
    It passed skip_modules=("lm_head",), which quantized GPT-NeoX Japanese's embed_out (and warned that lm_head
    matches no module)."""
    from transformers import GPTNeoXJapaneseConfig, GPTNeoXJapaneseForCausalLM

    from int8mm.cli import compare

    torch.manual_seed(0)
    model = GPTNeoXJapaneseForCausalLM(GPTNeoXJapaneseConfig(
        vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_multiple_size=2,
        max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2))
    source = _save_with_tokenizer(model.eval(), tiny_checkpoint, tmp_path / "neox-japanese")
    compared = []
    original = compare.compare_full_and_8bit

    def recording(model, *args, **kwargs):
        compared.append(model)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(compare, "compare_full_and_8bit", recording)
    code, _, err = run_cli(capsys, "eval", source, "--text", text_file)
    assert code == 0, err
    (quantized,) = compared
    assert type(quantized.embed_out) is torch.nn.Linear  # float, not an Int8Linear
    assert isinstance(quantized.gpt_neox_japanese.layers[0].mlp.dense_h_to_4h, int8mm.Int8Linear)


def _quantized_reference(checkpoint, threshold):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    return int8mm.quantize_model(model, threshold=threshold)


def test_quantize_writes_an_8bit_checkpoint_that_loads_back(capsys, tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out_dir = tmp_path / "int8"
    code, out, err = run_cli(capsys, "quantize", tiny_checkpoint, out_dir, "--threshold", "5")
    assert code == 0, err
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out_dir.iterdir()}
    config = json.loads((out_dir / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "int8mm", "threshold": 5.0, "skip_modules": ["lm_head"]}
    state = load_file(out_dir / "model.safetensors")
    prefix = "model.layers.0.mlp.up_proj."
    assert state[prefix + "weight"].dtype == torch.int8 and state[prefix + "SCB"].dtype == torch.float32
    assert int(state[prefix + "weight_format"]) == 0
    assert state["lm_head.weight"].dtype == torch.float32  # skipped by default

    expected = _quantized_reference(tiny_checkpoint, threshold=5.0)
    for name, module in expected.named_modules():
        if isinstance(module, int8mm.Int8Linear):
            assert torch.equal(state[f"{name}.weight"], module.weight), name
            assert torch.equal(state[f"{name}.SCB"], module.SCB), name
    loaded = AutoModelForCausalLM.from_pretrained(out_dir)  # 8-bit again, with no quantization_config given
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    assert torch.equal(loaded(ids).logits, expected(ids).logits)


OTHER_WEIGHT_FILES = ("model.onnx", "model.onnx_data", "decoder.onnx.data", "rust_model.ot", "model.tflite",
                      "model.ckpt", "model.ckpt.index", "model.ckpt.data-00000-of-00001", "flax_model.msgpack",
                      "tf_model.h5", "tf_model.h5.index.json", "model.mlmodel")
OTHER_FILES = ("README.md", "chat_template.jinja", "special_tokens_map.json", "merges.txt", "LICENSE")


def test_quantize_copies_no_weights_of_other_formats(capsys, tiny_checkpoint, tmp_path):
    """Weights in formats quantize does not read (ONNX, Rust, TFLite, TensorFlow, Core ML) were copied: full
    precision files in the 8-bit checkpoint, left out of its size report. Nor does the source's size count them:
    it is the size of what was read and quantized."""
    import re
    import shutil

    source = tmp_path / "source"
    shutil.copytree(tiny_checkpoint, source)
    for name in OTHER_WEIGHT_FILES:
        (source / name).write_bytes(bytes(2**17))
    for name in OTHER_FILES:
        (source / name).write_text(name)
    code, out, err = run_cli(capsys, "quantize", source, tmp_path / "int8")
    assert code == 0, err
    written = {p.name for p in (tmp_path / "int8").iterdir()}
    assert written & set(OTHER_WEIGHT_FILES) == set(), written
    assert set(OTHER_FILES) | {"tokenizer.json", "tokenizer_config.json"} <= written
    source_bytes = (source / "model.safetensors").stat().st_size  # what was read and quantized, not the copies
    assert re.search(rf"the source's: {source_bytes / 2**20:.1f} MiB", out), out


def test_quantize_with_a_bitsandbytes_config_loads_in_bitsandbytes(capsys, tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    out_dir = tmp_path / "bnb"
    code, _, err = run_cli(capsys, "quantize", tiny_checkpoint, out_dir, "--bitsandbytes-config")
    assert code == 0, err
    assert json.loads((out_dir / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"
    loaded = AutoModelForCausalLM.from_pretrained(out_dir)
    bnb_layer = loaded.model.layers[0].mlp.up_proj
    assert type(bnb_layer).__name__ == "Linear8bitLt"
    expected = _quantized_reference(tiny_checkpoint, threshold=6.0)
    assert torch.equal(bnb_layer.weight.data, expected.model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize("flag", [[], ["--bitsandbytes-config"]])
def test_quantize_writes_an_infinite_threshold_as_strict_json(capsys, tiny_checkpoint, tmp_path, flag):
    """--threshold inf --bitsandbytes-config wrote a bare Infinity, which strict JSON readers refuse; it is written
    as transformers writes it in its own configs (and in the int8mm one), and read back as inf."""
    from transformers import AutoConfig

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    out_dir = tmp_path / "int8"
    code, _, err = run_cli(capsys, "quantize", tiny_checkpoint, out_dir, "--threshold", "inf", *flag)
    assert code == 0, err
    json.loads((out_dir / "config.json").read_text(), parse_constant=refuse)
    entry = AutoConfig.from_pretrained(out_dir).quantization_config
    entry = entry if isinstance(entry, dict) else entry.to_dict()
    assert entry["llm_int8_threshold" if flag else "threshold"] == float("inf"), entry


def _linear_names(checkpoint):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint))
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


@pytest.mark.parametrize("skip", [None, ["layers.0", "lm_head"], ["mlp"], ["self_attn.q_proj", "lm_head"],
                                  ["model.layers.1"], ["up_proj"]])
def test_quantize_bitsandbytes_skip_list_selects_the_saved_float_layers(capsys, tiny_checkpoint, tmp_path, skip):
    """bitsandbytes must convert exactly the layers saved in int8: it reads llm_int8_skip_modules with
    transformers' rule (a prefix, or endswith), not int8mm's (a run of components anywhere); "layers.0" left
    model.layers.0.* float in the file while bitsandbytes built Linear8bitLt for them."""
    from safetensors.torch import load_file
    from transformers.quantizers.quantizers_utils import should_convert_module

    out_dir = tmp_path / "bnb"
    code, _, err = run_cli(capsys, "quantize", tiny_checkpoint, out_dir, "--bitsandbytes-config",
                           *(["--skip", *skip] if skip else []))
    assert code == 0, err
    patterns = json.loads((out_dir / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    state = load_file(out_dir / "model.safetensors")
    names = _linear_names(tiny_checkpoint)
    int8 = [name for name in names if state[f"{name}.weight"].dtype == torch.int8]
    kept = [name for name in names if name not in int8]
    assert int8 and kept, (int8, kept)  # both kinds, or the test checks one rule only
    assert [name for name in int8 if not should_convert_module(name, patterns)] == [], patterns
    assert [name for name in kept if should_convert_module(name, patterns)] == [], patterns


def test_quantize_with_a_bitsandbytes_config_and_skip_runs_in_bitsandbytes(capsys, tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    out_dir = tmp_path / "bnb"
    code, _, err = run_cli(capsys, "quantize", tiny_checkpoint, out_dir, "--bitsandbytes-config", "--skip",
                           "layers.0", "lm_head")
    assert code == 0, err
    loaded = AutoModelForCausalLM.from_pretrained(out_dir)
    assert type(loaded.model.layers[0].mlp.up_proj) is torch.nn.Linear  # was a Linear8bitLt holding float weights
    assert type(loaded.model.layers[1].mlp.up_proj).__name__ == "Linear8bitLt"
    logits = loaded(torch.tensor([[3, 4, 5, 6]])).logits  # AttributeError: 'Parameter' has no attribute 'CB'
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_demo_runs_on_the_embedded_model(capsys):
    code, out, err = run_cli(capsys, "demo", "--max-tokens", "48", "--window", "24", "--new-tokens", "4")
    assert code == 0, err
    full, eight_bit = perplexities(out)
    assert 1.0 < full < 200 and abs(eight_bit / full - 1) < 0.1, (full, eight_bit)  # a real model, real text
    assert out.count("    ") >= 2  # one indented continuation per variant
    sizes = [float(v) for v in re.findall(r"\| ([\d.]+) MiB", out)]
    assert sizes[1] < 0.5 * sizes[0]  # int8 weights: well under half of fp32 (embeddings stay float)


@pytest.mark.slow
def test_python_dash_m_runs_the_command():
    done = subprocess.run([sys.executable, "-m", "int8mm", "info"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "int8mm backends" in done.stdout


@pytest.mark.slow
def test_a_reader_that_leaves_early_gets_no_traceback():
    """``int8mm info | head -1``: the pipe closes after one line; the command stops quietly (status 141)."""
    done = subprocess.run(f"'{sys.executable}' -m int8mm info | head -1", shell=True, capture_output=True,
                          text=True, timeout=600, executable="/bin/bash")
    assert done.stdout.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("argv, message", [
    (["eval", "{tmp}/missing"], "MODEL_DIR '{tmp}/missing' does not exist"),
    (["eval", "{tmp}"], "is not a Hugging Face model directory (it has no config.json)"),
    (["eval", "{ckpt}", "--text", "{tmp}/nothing.txt"], "--text '{tmp}/nothing.txt' is not a readable file"),
    (["eval", "{ckpt}", "--backend", "fastest"], "--backend: backend must be a Backend or one of"),
    (["eval", "{ckpt}", "--device", "cpu", "--backend", "cuda"], "--backend: backend 'cuda' is not available on cpu"),
    (["eval", "{ckpt}", "--threshold", "-1"], "--threshold must be >= 0"),
    (["eval", "{ckpt}", "--window", "1"], "--window must be >= 2"),
    (["eval", "{ckpt}", "--new-tokens", "4", "--prompt", ""], "--prompt '' is empty: give the text to continue"),
    (["demo", "--prompt", " "], "--prompt ' ' is empty: give the text to continue, or --new-tokens 0"),
    (["bench", "--device", "cuda:99"], "--device: device 'cuda:99' was requested but torch sees "),
    (["bench", "--models", "GPT-5"], "unknown model 'GPT-5'"),
    (["bench", "--backends", "fastest"], "backend must be a Backend or one of"),
    (["bench", "--m", "1", "0"], "--m must be >= 1, got 0"),
    (["bench", "--reps", "0"], "--reps must be >= 1, got 0"),
    (["bench", "--outlier-cols", "-1"], "--outlier-cols must be >= 0, got -1"),
    (["bench", "--outlier-low", "70"], "--outlier-low 70 is above --outlier-high 60 (the default)"),
    (["bench", "--graph-max-m", "-5"], "--graph-max-m must be >= 0, got -5"),
    (["bench", "--suite", "model", "--new-tokens", "1"], "--new-tokens must be >= 2, got 1"),
    (["bench", "--suite", "model", "--prompt-tokens", "0"], "--prompt-tokens must be >= 1, got 0"),
    (["bench", "--suite", "model", "--batch-sizes", "1", "0"], "--batch-sizes must be >= 1, got 0"),
    (["demo", "--threads", "0"], "--threads must be >= 1, got 0"),
    (["bench", "--device", "tpu"], "--device: device must be 'auto', 'cpu' or 'cuda', got 'tpu'"),
    (["bench", "--suite", "everything"], "argument --suite: invalid choice: 'everything'"),
    (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
    (["eval"], "the following arguments are required: MODEL_DIR"),
    (["eval", "{ckpt}", "--max-tokens", "1"], "--max-tokens must be >= 2"),
    (["eval", "{ckpt}", "--text", "{tmp}/one.txt"], "the text holds fewer than 2 tokens"),
    (["eval", "{ckpt}", "--text", "{tmp}/latin1.txt"], "--text '{tmp}/latin1.txt' is not UTF-8 text (byte 0xe9 at "
                                                       "offset 3)"),
    (["bench", "--threshold", "-1"], "--threshold must be >= 0"),
    (["bench", "--threshold", "nan"], "--threshold must be >= 0"),
    (["bench", "--out", "{tmp}/one.txt"], "--out '{tmp}/one.txt' exists and is not a directory"),
    (["bench", "--suite", "model", "--models", "Nope", "--m", "3"],
     "--models, --m: option(s) of the kernel suite, which --suite model does not run"),
    (["bench", "--preset", "tiny"], "--preset: option(s) of the model suite, which --suite kernels does not run"),
    (["bench", "--suite", "host", "--quick", "--no-bnb", "--threshold", "3"],
     "--threshold, --no-bnb, --quick: option(s) of the kernel or model suite, which --suite host does not run"),
    (["bench", "--suite", "host", "--threshold", "0"],  # 0 == False: it was taken for "not given"
     "--threshold: option(s) of the kernel or model suite, which --suite host does not run"),
    (["bench", "--suite", "model", "--reps", "0"], "--reps: option(s) of the kernel suite, which --suite model"),
    (["bench", "--suite", "model", "--layers", "0"], "--layers must be >= 1, got 0"),
    (["bench", "--suite", "model", "--no-bnb", "--providers", "float", "bnb"],
     "--no-bnb leaves out bitsandbytes, which --providers float bnb asks for: give one of them"),
    (["bench", "--suite", "model", "--layers", "-2"], "--layers must be >= 1, got -2"),
])
def test_bad_arguments_give_one_line_and_status_2(capsys, tmp_path, tiny_checkpoint, argv, message):
    (tmp_path / "one.txt").write_text("state")  # one token
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    argv = [a.format(tmp=tmp_path, ckpt=tiny_checkpoint) for a in argv]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert out == ""
    assert len(error_lines(err)) == 1 and "Traceback" not in err, err
    assert message.format(tmp=tmp_path, ckpt=tiny_checkpoint) in err


def test_a_directory_transformers_cannot_load_is_one_line(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    code, _, err = run_cli(capsys, "eval", tmp_path)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"'{tmp_path / 'config.json'}' names no model class ('architectures')" in err


@pytest.mark.parametrize("command", ["quantize", "eval"])
@pytest.mark.parametrize("file, edit, reason", [
    ("config.json", {"hidden_size": "64"}, "Validation error for field 'hidden_size': TypeError: Field "
                                           "'hidden_size' expected int, got str (value: '64')"),
    ("config.json", {"num_attention_heads": 5}, "ValueError: The hidden size (64) is not a multiple of the number of "
                                                "attention heads (5)."),
    ("generation_config.json", [1, 2], "as a generation config: TypeError: 'list' object is not a mapping"),
    ("generation_config.json", {"max_new_tokens": "lots"}, "as a generation config: TypeError: '<=' not supported"),
], ids=["hidden_size-str", "heads-not-dividing", "generation-list", "max_new_tokens-str"])
def test_an_invalid_config_value_is_a_usage_error_naming_the_file(capsys, tiny_checkpoint, tmp_path, command, file,
                                                                  edit, reason):
    """It went through the catch-all (status 1) with only the message's first line, which ends in a colon."""
    import shutil

    source = tmp_path / "source"
    shutil.copytree(tiny_checkpoint, source)
    if file == "config.json":
        edit = {**json.loads((source / file).read_text()), **edit}
    (source / file).write_text(json.dumps(edit))
    argv = [command, source, *([tmp_path / "out"] if command == "quantize" else ["--text", source / file])]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == "" and len(error_lines(err)) == 1, err
    assert f"int8mm {command}: error: cannot read '{source / file}'" in err and reason in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]  # refused before anything was written


def test_quantize_leaves_a_non_empty_out_dir_alone(capsys, tiny_checkpoint, tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    code, _, err = run_cli(capsys, "quantize", tiny_checkpoint, tmp_path)
    assert code == 2 and f"OUT_DIR '{tmp_path}' exists and is not an empty directory" in err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_a_bad_default_backend_is_one_line_before_any_work(capsys, monkeypatch, tiny_checkpoint, tmp_path):
    monkeypatch.setenv("INT8MM_BACKEND", "bogus")  # (empty counts as unset, as for INT8MM_CACHE)
    for argv in (["eval", tiny_checkpoint], ["bench", "--suite", "model", "--out", tmp_path / "out"]):
        code, out, err = run_cli(capsys, *argv)
        assert code == 2 and out == "" and err.count("\n") == 1, err
        assert "INT8MM_BACKEND must be a Backend or one of" in err
    code, out, _ = run_cli(capsys, "info")
    assert code == 0 and "default backend: none: INT8MM_BACKEND must be" in out


def test_a_truncated_checkpoint_is_one_line(capsys, tiny_checkpoint, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    for argv in (["eval", bad], ["quantize", bad, tmp_path / "out"]):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and len(error_lines(err)) == 1 and "Traceback" not in err, err
        assert f"cannot load LlamaForCausalLM from '{bad}'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # quantize left nothing behind


def test_quantize_failing_to_write_leaves_nothing(capsys, tiny_checkpoint, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    code, _, err = run_cli(capsys, "quantize", tiny_checkpoint, tmp_path / "out")
    assert code == 2 and "No space left on device" in err and len(error_lines(err)) == 1, err
    assert list(tmp_path.iterdir()) == []  # no OUT_DIR, no partial directory


def test_quantize_refused_or_terminated_leaves_no_directory(capsys, tiny_checkpoint, tmp_path, monkeypatch):
    """A refused run removes the directories it made for OUT_DIR; SIGTERM (timeout, docker stop) cleans up as
    Ctrl-C does, where it left a hidden partial directory behind."""
    import os
    import signal

    from int8mm.cli import quantize

    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bad / name).write_bytes((tiny_checkpoint / name).read_bytes()[:1000] if name.endswith("tensors") else
                                 (tiny_checkpoint / name).read_bytes())
    code, _, err = run_cli(capsys, "quantize", bad, tmp_path / "new" / "a" / "out")
    assert code == 2 and "cannot load" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # no new/a left behind

    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(quantize, "_write", lambda *args: os.kill(os.getpid(), signal.SIGTERM))
    code, _, err = run_cli(capsys, "quantize", tiny_checkpoint, tmp_path / "new" / "out")
    assert code == 143 and "int8mm: terminated" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]
    assert signal.getsignal(signal.SIGTERM) is handler  # put back after the command
    (tmp_path / "empty").mkdir()  # an existing OUT_DIR: its hidden partial goes, the directory stays
    code, _, err = run_cli(capsys, "quantize", tiny_checkpoint, tmp_path / "empty")
    assert code == 143 and list((tmp_path / "empty").iterdir()) == [], err


def test_quantize_writes_through_a_symlinked_out_dir(capsys, tiny_checkpoint, tmp_path):
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    code, _, err = run_cli(capsys, "quantize", tiny_checkpoint, tmp_path / "link")
    assert code == 0, err  # was "writing ... failed: Not a directory", after all the work
    assert (tmp_path / "link").is_symlink() and (tmp_path / "target" / "model.safetensors").is_file()


def _busy(monkeypatch, directory):
    """os.rmdir, os.rename and os.replace of ``directory`` itself fail as on a mount point (EBUSY)."""
    import errno
    import os

    def refusing(original):
        def call(*paths, **kwargs):
            if any(os.path.abspath(path) == str(directory) for path in paths[:2]):
                raise OSError(errno.EBUSY, "Device or resource busy", str(directory))
            return original(*paths, **kwargs)
        return call

    for name in ("rmdir", "rename", "replace"):
        monkeypatch.setattr(os, name, refusing(getattr(os, name)))


def test_quantize_into_an_existing_empty_directory_keeps_it(capsys, tiny_checkpoint, tmp_path, monkeypatch):
    """An empty OUT_DIR (a mount point, a directory with its own mode or group) is written in place: it was
    removed and a sibling renamed over it, which failed with EBUSY on a mount point after all the work, needed a
    writable parent, and lost the directory's inode and mode."""
    import os
    import stat

    out_dir = tmp_path / "mounted"
    out_dir.mkdir()
    os.chmod(out_dir, 0o2770)
    before = out_dir.stat()
    _busy(monkeypatch, out_dir)
    code, out, err = run_cli(capsys, "quantize", tiny_checkpoint, out_dir)
    assert code == 0, err
    after = out_dir.stat()
    assert (after.st_ino, stat.S_IMODE(after.st_mode)) == (before.st_ino, 0o2770)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out_dir.iterdir()}
    assert not [p.name for p in out_dir.iterdir() if p.name.startswith(".")]  # the hidden partial is gone
    assert [p.name for p in tmp_path.iterdir()] == ["mounted"]  # nothing written next to it
    assert f"wrote {out_dir}: config.json," in out


def test_quantize_failing_to_move_into_an_existing_directory_leaves_it_empty(capsys, tiny_checkpoint, tmp_path,
                                                                             monkeypatch):
    import os

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    replace, calls = os.replace, []

    def second_fails(src, dst, **kwargs):  # one file moved up already, the rest (config.json) not
        calls.append(os.path.basename(dst))
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", second_fails)
    code, _, err = run_cli(capsys, "quantize", tiny_checkpoint, out_dir)
    assert code == 2 and "No space left on device" in err and len(error_lines(err)) == 1, err
    assert "config.json" not in calls[:2]  # moved last: a half-moved directory is never taken for a model
    assert out_dir.is_dir() and list(out_dir.iterdir()) == []  # as it was: a second run is not refused


def test_quantize_names_a_partial_output_left_in_out_dir(capsys, tiny_checkpoint, tmp_path):
    (tmp_path / ".partial-123-0badcafe").mkdir()  # a run killed with SIGKILL leaves it
    code, _, err = run_cli(capsys, "quantize", tiny_checkpoint, tmp_path)
    assert code == 2 and len(error_lines(err)) == 1, err
    assert "holds only the partial output of an unfinished int8mm quantize (.partial-123-0badcafe)" in err


# ---- the model class comes from config.json; what a command cannot do is one line and status 2 ----
def _save_with_tokenizer(model, source, path):
    import shutil

    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, path / name)
    return path


def _tiny(family):
    from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForSequenceClassification)

    torch.manual_seed(0)
    if family == "BertModel":
        return BertModel(BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128, max_position_embeddings=64))
    if family == "LlamaForSequenceClassification":
        return LlamaForSequenceClassification(LlamaConfig(
            vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_labels=3, pad_token_id=0))
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=1, eos_token_id=2))


@pytest.mark.parametrize("family", ["BertModel", "LlamaForSequenceClassification", "GPT2LMHeadModel"])
def test_quantize_keeps_the_model_class(capsys, tiny_checkpoint, tmp_path, family):
    import transformers
    from safetensors.torch import load_file

    source = _save_with_tokenizer(_tiny(family).eval(), tiny_checkpoint, tmp_path / "float")
    code, _, err = run_cli(capsys, "quantize", source, tmp_path / "int8")
    assert code == 0, err
    config = json.loads((tmp_path / "int8" / "config.json").read_text())
    assert config["architectures"] == [family]
    float_keys = set(load_file(source / "model.safetensors"))
    int8_keys = {k for k in load_file(tmp_path / "int8" / "model.safetensors") if not k.endswith((".SCB",
                                                                                                  ".weight_format"))}
    assert int8_keys == float_keys  # no head added (a BertModel was saved as BertLMHeadModel before)
    loaded = getattr(transformers, family).from_pretrained(tmp_path / "int8")
    assert type(loaded).__name__ == family
    assert sum(isinstance(m, int8mm.Int8Linear) for m in loaded.modules()) > 0
    if family == "LlamaForSequenceClassification":  # the classifier's head stays float, as with bitsandbytes
        assert not isinstance(loaded.score, int8mm.Int8Linear)


def test_eval_refuses_a_model_without_a_language_model_head(capsys, tiny_checkpoint, tmp_path, text_file):
    source = _save_with_tokenizer(_tiny("BertModel"), tiny_checkpoint, tmp_path / "bert")
    code, out, err = run_cli(capsys, "eval", source, "--text", text_file)
    assert code == 2 and out == "" and len(error_lines(err)) == 1 and "Traceback" not in err, err
    assert f"{source} holds a BertModel, which has no language-model head" in err


def test_eval_refuses_a_directory_without_a_tokenizer(capsys, tiny_checkpoint, tmp_path, text_file):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_checkpoint, bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    code, out, err = run_cli(capsys, "eval", bare, "--text", text_file)
    assert code == 2 and out == "" and len(error_lines(err)) == 1, err  # not a perplexity from another tokenizer
    assert f"{bare} holds no tokenizer (none of tokenizer.json," in err


def test_eval_refuses_a_vocabulary_smaller_than_the_tokenizer(capsys, tiny_checkpoint, tmp_path, text_file):
    from transformers import LlamaConfig, LlamaForCausalLM

    small = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1,
                                         eos_token_id=2))
    source = _save_with_tokenizer(small, tiny_checkpoint, tmp_path / "small")
    code, out, err = run_cli(capsys, "eval", source, "--text", text_file)
    assert code == 2 and out == "" and len(error_lines(err)) == 1 and "Traceback" not in err, err  # was IndexError
    assert re.search(r"the model's vocabulary \(8 tokens, config.json vocab_size\) is smaller than its "
                     r"tokenizer's \(\d+\)", err), err


def test_an_unforeseen_failure_is_one_line_and_status_1(capsys, monkeypatch, tiny_checkpoint, text_file):
    from int8mm.cli import compare

    def broken(*args, **kwargs):
        raise IndexError("index out of range in self")

    monkeypatch.setattr(compare, "compare_full_and_8bit", broken)
    monkeypatch.delenv("INT8MM_TRACEBACK", raising=False)
    code, out, err = run_cli(capsys, "eval", tiny_checkpoint, "--text", text_file)
    assert code == 1 and "Traceback" not in err
    assert error_lines(err)[-1] == ("int8mm eval: failed: IndexError: index out of range in self (set "
                                    "INT8MM_TRACEBACK=1 for the traceback)")
    monkeypatch.setenv("INT8MM_TRACEBACK", "1")
    with pytest.raises(IndexError):
        main(["eval", str(tiny_checkpoint), "--text", str(text_file)])


def test_an_unforeseen_failure_keeps_the_lines_after_the_first(capsys, monkeypatch, tiny_checkpoint, text_file):
    from int8mm.cli import compare

    def broken(*args, **kwargs):  # the shape of huggingface_hub's validation errors: the reason on line two
        raise RuntimeError("Validation error for field 'x':\n    TypeError: expected int")

    monkeypatch.setattr(compare, "compare_full_and_8bit", broken)
    monkeypatch.delenv("INT8MM_TRACEBACK", raising=False)
    code, _, err = run_cli(capsys, "eval", tiny_checkpoint, "--text", text_file)
    assert code == 1
    assert error_lines(err)[-1] == ("int8mm eval: failed: RuntimeError: Validation error for field 'x': TypeError: "
                                    "expected int (set INT8MM_TRACEBACK=1 for the traceback)")


@pytest.mark.parametrize("name,expected", [("auto", int8mm.Backend.AUTO), ("reference", int8mm.Backend.REFERENCE),
                                           (None, None)])
def test_backend_option_keeps_auto_choosing_per_call(name, expected):
    """--backend auto is checked but passed on as AUTO, which chooses per call (on CUDA by the number of rows),
    not resolved once for the whole command."""
    from argparse import Namespace
    from int8mm.cli.common import checked_backend
    assert checked_backend(Namespace(backend=name), torch.device("cpu")) is expected


# ---- what each command cannot do with the input given is refused before the work, in one line ----
def _marked_quantized(tiny_checkpoint, path, quantization_config):
    """A copy of the tiny checkpoint whose config.json says it is quantized (refused before any weight is read)."""
    import shutil

    shutil.copytree(tiny_checkpoint, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    return path


QUANTIZATION_CONFIGS = {"int8mm": {"quant_method": "int8mm", "threshold": 6.0, "skip_modules": ["lm_head"]},
                        "bitsandbytes": {"quant_method": "bitsandbytes", "load_in_8bit": True}}


@pytest.mark.parametrize("method", list(QUANTIZATION_CONFIGS))
def test_eval_refuses_a_quantized_checkpoint(capsys, tiny_checkpoint, tmp_path, text_file, method):
    source = _marked_quantized(tiny_checkpoint, tmp_path / "q", QUANTIZATION_CONFIGS[method])
    code, out, err = run_cli(capsys, "eval", source, "--text", text_file)
    assert code == 2 and out == "" and len(error_lines(err)) == 1, err  # not an 8-bit vs 8-bit "comparison"
    assert f"MODEL_DIR '{source}' is already quantized (config.json has a '{method}' quantization_config)" in err


@pytest.mark.parametrize("method", list(QUANTIZATION_CONFIGS))
def test_quantize_refuses_a_quantized_checkpoint(capsys, tiny_checkpoint, tmp_path, method):
    source = _marked_quantized(tiny_checkpoint, tmp_path / "q", QUANTIZATION_CONFIGS[method])
    code, out, err = run_cli(capsys, "quantize", source, tmp_path / "again", "--threshold", "2")
    assert code == 2 and out == "" and len(error_lines(err)) == 1, err  # --threshold 2 was ignored before
    assert f"MODEL_DIR '{source}' is already quantized" in err and "full-precision checkpoint" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_eval_window_is_cut_to_the_positions_of_the_model(capsys, tiny_checkpoint, tmp_path, text_file):
    source = _save_with_tokenizer(_tiny("GPT2LMHeadModel").eval(), tiny_checkpoint, tmp_path / "gpt2")  # 64 positions
    code, out, err = run_cli(capsys, "eval", source, "--text", text_file)  # default --window 1024: an IndexError
    assert code == 0, err
    assert f"--window 1024 is longer than the 64 positions {source} takes" in err
    assert "in windows of 64" in out and len(perplexities(out)) == 2


def test_eval_refuses_a_continuation_past_the_positions_of_the_model(capsys, tiny_checkpoint, tmp_path, text_file):
    source = _save_with_tokenizer(_tiny("GPT2LMHeadModel").eval(), tiny_checkpoint, tmp_path / "gpt2")  # 64 positions
    prompt = "the state of"  # 3 tokens with the word-level tokenizer
    code, out, err = run_cli(capsys, "eval", source, "--text", text_file, "--prompt", prompt, "--new-tokens", "63")
    assert code == 2 and out == "" and len(error_lines(err)) == 1, err  # an IndexError after the fp32 half before
    assert f"--new-tokens 63 after the prompt's 3 tokens feeds the model 65 positions, past the 64 that {source}" in err
    assert "give at most 62" in err
    # 62 new tokens fill the 64 positions exactly: the last one generated is never fed back
    code, out, err = run_cli(capsys, "eval", source, "--text", text_file, "--prompt", prompt, "--new-tokens", "62")
    assert code == 0, err


def test_quantize_into_the_current_directory(capsys, tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "quantize", tiny_checkpoint, ".")  # Path(".").name is "": failed at the end
    assert code == 0, err
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant_method"] == "int8mm"
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.parent.glob(f".{tmp_path.name}.partial*"))


def test_busy_host_warning_suggests_one_thread_only_to_runs_with_more(capsys, monkeypatch):
    from int8mm.cli import compare

    monkeypatch.setattr(compare, "load_average", lambda: 99.0)
    for count, advised in ((2, True), (1, False)):
        with torch_threads(count):
            compare._warn_if_busy(torch.device("cpu"))
        err = capsys.readouterr().err
        assert "the host is busy (load average 99.0" in err and ("--threads 1 steadies them" in err) == advised


def test_eval_refuses_a_skip_pattern_that_matches_no_module(capsys, tiny_checkpoint, text_file):
    code, out, err = run_cli(capsys, "eval", tiny_checkpoint, "--text", text_file, "--skip", "lm_head", "lm_hed")
    assert code == 2 and out == "" and len(error_lines(err)) == 1, err  # the typo kept nothing in full precision
    assert "--skip 'lm_hed' matches no module of LlamaForCausalLM (give module names or dotted suffixes" in err


def test_quantize_refuses_a_skip_pattern_that_matches_no_module(capsys, tiny_checkpoint, tmp_path):
    # the typo replaced the default list: lm_head was quantized and saved so, after one UserWarning
    code, out, err = run_cli(capsys, "quantize", tiny_checkpoint, tmp_path / "int8", "--skip", "lm_haed")
    assert code == 2 and out == "" and len(error_lines(err)) == 1, err
    assert "--skip 'lm_haed' matches no module of LlamaForCausalLM (give module names or dotted suffixes" in err
    assert not list(tmp_path.iterdir())  # refused before anything was written
    code, _, err = run_cli(capsys, "quantize", tiny_checkpoint, tmp_path / "int8", "--skip", "lm_head", "up_proj")
    assert code == 0, err


def test_help_names_every_backend_and_the_cpu_baseline(capsys):
    _, out, _ = run_cli(capsys, "eval", "--help")
    assert "auto, reference, cpu, triton or cuda" in " ".join(out.split())
    _, out, _ = run_cli(capsys, "bench", "--help")
    assert "F.linear (fp16 on a GPU, fp32 on CPU)" in " ".join(out.split())


def test_quantize_reports_the_size_of_a_pytorch_checkpoint_it_read(capsys, tiny_checkpoint, tmp_path):
    """A source without safetensors: its size is that of the PyTorch file from_pretrained read."""
    import re
    import shutil

    from transformers import LlamaForCausalLM

    source = tmp_path / "source"
    shutil.copytree(tiny_checkpoint, source, ignore=shutil.ignore_patterns("*.safetensors*"))
    torch.save(LlamaForCausalLM.from_pretrained(tiny_checkpoint).state_dict(), source / "pytorch_model.bin")
    (source / "model.onnx").write_bytes(bytes(2**20))  # a copy in another format: not what was read
    code, out, err = run_cli(capsys, "quantize", source, tmp_path / "int8")
    assert code == 0, err
    read = sum(p.stat().st_size for p in source.glob("*.bin"))
    assert read > 0 and re.search(rf"the source's: {read / 2**20:.1f} MiB", out), out
