"""Tiny random models of every supported family, built in memory, and a word-level tokenizer for them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    RobertaConfig,
)

VOCAB = 128
# Shared shape: hidden 32, 4 heads of 8, 2 KV heads where the family has GQA, 3 blocks.
_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
_SLIDING = dict(sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
_ENCODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                num_attention_heads=4, max_position_embeddings=64)

TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**_DECODER),
    "mistral": lambda: MistralConfig(**_DECODER, sliding_window=8),
    "qwen2": lambda: Qwen2Config(**_DECODER, use_sliding_window=True, **_SLIDING),
    "qwen3": lambda: Qwen3Config(**_DECODER, head_dim=8),
    "gemma": lambda: GemmaConfig(**_DECODER, head_dim=8),
    "gemma2": lambda: Gemma2Config(**_DECODER, head_dim=8, **_SLIDING),
    "gemma3": lambda: Gemma3TextConfig(**_DECODER, head_dim=8, **_SLIDING),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64),
    "opt": lambda: OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=3,
                             num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32),
    "bert": lambda: BertConfig(**_ENCODER),
    "roberta": lambda: RobertaConfig(**_ENCODER, pad_token_id=1),
}
DECODERS = [name for name in TINY_CONFIGS if name not in ("bert", "roberta")]


def _moe_config(name: str):
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=2)
    return {
        "mixtral": lambda: MixtralConfig(**common, num_local_experts=6),
        "qwen2_moe": lambda: Qwen2MoeConfig(**common, num_experts=6, moe_intermediate_size=16,
                                            shared_expert_intermediate_size=32),
        "qwen3_moe": lambda: Qwen3MoeConfig(**common, num_experts=6, moe_intermediate_size=16),
        "olmoe": lambda: OlmoeConfig(**common, num_experts=6, pad_token_id=0, eos_token_id=1, bos_token_id=2),
    }[name]()


MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


def tiny_moe(family: str, seed: int = 0):
    """A random stock mixture-of-experts causal LM (6 experts, top-2, 2 blocks) in eval mode."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(_moe_config(family)).eval()


def tiny_model(family: str, seed: int = 0):
    """A random model of ``family`` in eval mode: a causal LM for decoders, the bare encoder otherwise."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS[family]()
    cls = AutoModel if family in ("bert", "roberta") else AutoModelForCausalLM
    return cls.from_config(config).eval()


BOS = VOCAB - 1  # the id of "<s>" in a tokenizer made with bos=True


def tiny_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny vocabulary: words ``w0 .. w127``, ``w0`` also unknown.

    With ``bos``, ``w127`` is replaced by ``<s>``, which the tokenizer puts in front of every text,
    as Llama's and Gemma's tokenizers do (``add_bos_token``).
    """
    vocab = {f"w{i}": i for i in range(VOCAB - bos)} | ({"<s>": BOS} if bos else {})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0", bos_token="<s>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0")


def random_ids(n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``(n, seqlen)`` random token ids of the tiny vocabulary."""
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def calibration_text(folder: Path) -> Path:
    """``folder/calib.txt``: 400 words of the tiny vocabulary, a calibration source for the CLI."""
    text = Path(folder) / "calib.txt"
    text.write_text(" ".join(f"w{(i * 11) % VOCAB}" for i in range(400)))
    return text


@pytest.fixture
def saved_tiny(tmp_path):
    """A tiny Llama saved with its tokenizer in ``tmp_path/m``, and 400 words of calibration text."""
    from slimformer import save_model

    path = save_model(tiny_model("llama"), tiny_tokenizer(), tmp_path / "m")
    return path, calibration_text(tmp_path)


@pytest.fixture(params=list(TINY_CONFIGS))
def family(request) -> str:
    return request.param


@pytest.fixture(params=DECODERS)
def decoder_family(request) -> str:
    return request.param


# -- tolerances --------------------------------------------------------------------------------
# One quantity computed two ways (another kernel, thread count, batch shape or summation order)
# differs by float32 rounding: each operation rounds by eps = 1.2e-7 relative, a sum of K terms by
# up to K·eps of the sum of |terms| (typically √K·eps), and a model compounds that over its blocks.
# The tiny models reduce over ≤ 48 terms in ≤ 4 blocks: 1e-4 of the largest magnitude is ~50× the
# worst such rounding, and far below what a wrong computation (a shifted token, a missed mask) moves.
# A 30-block model with 576-wide sums gets 1e-3.
TINY_REL = 1e-4
DEEP_REL = 1e-3


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rel: float = TINY_REL) -> None:
    """``actual ≈ expected`` elementwise, with the absolute tolerance scaled to the largest ``|expected|``."""
    scale = max(expected.detach().abs().max().item(), 1e-30)
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


def assert_ppl_close(actual: float, expected: float, nll_atol: float = TINY_REL) -> None:
    """Perplexities equal up to ``nll_atol`` nats of their mean NLL (the float32 sum's rounding, not the ratio's)."""
    import math

    assert abs(math.log(actual) - math.log(expected)) <= nll_atol, f"perplexity {actual} != {expected} (±{nll_atol} nats)"


def bpe_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style, the kind GGUF stores with merges) trained on a fixed text, seeded."""
    from tokenizers import decoders, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    text = [f"the {w} of the model is {i} and the {w}s are small" for i, w in
            enumerate(["block", "head", "weight", "layer", "token", "expert", "window", "cache"] * 8)]
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
