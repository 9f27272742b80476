"""The model resolver: the default name becomes a converted local folder; anything else passes through."""

from pathlib import Path

from tokenwire.serving.model_resolver import DEFAULT_MODEL, resolve_model
from transformers import AutoConfig, AutoTokenizer


def test_other_names_pass_through_unchanged():
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_model("/models/my-llama") == "/models/my-llama"


def test_default_model_is_a_complete_plain_transformers_folder(smollm2_dir):
    folder = Path(smollm2_dir)
    assert resolve_model(DEFAULT_MODEL) == smollm2_dir  # second call reuses the cache
    config = AutoConfig.from_pretrained(folder)
    assert config.architectures == ["LlamaForCausalLM"] and config.vocab_size == 49152
    assert not hasattr(config, "quantization_config")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    # Conversion writes into a hidden staging folder and renames it: none may be left behind.
    assert not [p for p in folder.parent.iterdir() if p.is_dir() and p.name.startswith(".")]
