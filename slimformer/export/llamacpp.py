"""A GGUF file running in llama.cpp itself (through the ``xllamacpp`` binding): next-token log-probabilities, greedy decoding, final hidden states.

``xllamacpp`` is an optional extra (``pip install 'slimformer[llamacpp]'``): a prebuilt wheel of
llama.cpp's server, driven in-process. Its completion endpoint reports log-probabilities of the
tokens it generates, computed from the raw logits (before any sampler); it does not report them for
prompt tokens, so whole-text perplexity uses the server's native embedding endpoint instead, which
returns llama.cpp's final (normed) hidden state of every position; the output layer is then one
matrix product with the file's own output weights (see :meth:`LlamaCpp.hidden_states`).
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np

from slimformer.errors import SlimformerError


def _xllamacpp():
    try:
        import xllamacpp
    except ImportError as e:
        raise SlimformerError("running a GGUF in llama.cpp needs the xllamacpp wheel: "
                              "pip install 'slimformer[llamacpp]'") from e
    return xllamacpp


def available() -> bool:
    """Whether the llama.cpp binding is installed."""
    try:
        _xllamacpp()
    except SlimformerError:
        return False
    return True


class LlamaCpp:
    """One GGUF model loaded in llama.cpp, in generation mode or (``embeddings=True``) hidden-state mode.

    ``kv_f32`` keeps the KV cache in float32 (llama.cpp's default is float16).
    """

    def __init__(self, path: str | Path, *, n_ctx: int = 2048, threads: int = 2, embeddings: bool = False,
                 kv_f32: bool = False):
        xl = _xllamacpp()
        if not Path(path).is_file():
            raise SlimformerError(f"no GGUF file at '{path}'")
        params = xl.CommonParams()
        params.model.path = str(path)
        params.n_ctx = n_ctx
        params.n_batch = n_ctx
        params.n_ubatch = n_ctx if embeddings else min(n_ctx, 512)
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        params.n_parallel = 1
        params.warmup = False
        params.verbosity = -1
        if kv_f32:  # llama.cpp keeps K and V in float16 by default; float32 to compare with a float32 model exactly
            params.cache_type_k = params.cache_type_v = xl.ggml_type.GGML_TYPE_F32
            params.flash_attn_type = xl.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
        if embeddings:
            params.embedding = True
            params.pooling_type = xl.llama_pooling_type.LLAMA_POOLING_TYPE_NONE
        self.embeddings = embeddings
        self.server = xl.Server(params)

    def _complete(self, request: dict) -> dict:
        result = self.server.handle_completions({"cache_prompt": False, "temperature": 0.0, **request})
        if "error" in result:
            raise SlimformerError(f"llama.cpp: {result['error']}")
        return result

    def next_token_logprobs(self, ids: list[int], top: int) -> dict[int, float]:
        """log p(token | ids) for the ``top`` most likely next tokens, from llama.cpp's raw logits."""
        # The reported probabilities come from the raw logits; the grammar only makes the token actually sampled a
        # whole character, since llama.cpp withholds the log-probabilities of a token that ends mid-UTF-8 sequence.
        result = self._complete({"prompt": list(ids), "n_predict": 1, "n_probs": top, "post_sampling_probs": False,
                                 "ignore_eos": True, "grammar": "root ::= [ -~]"})
        entry = result["choices"][0]["logprobs"]["content"][0]
        return {t["id"]: t["logprob"] for t in entry["top_logprobs"]}

    def generate(self, ids: list[int], new_tokens: int) -> tuple[list[int], float]:
        """Greedy continuation of ``ids`` (``new_tokens`` tokens, end-of-text ignored) and llama.cpp's decode tokens/s."""
        result = self._complete({"prompt": list(ids), "n_predict": new_tokens, "ignore_eos": True, "n_probs": 1,
                                 "post_sampling_probs": False})
        tokens = [t["id"] for t in result["choices"][0]["logprobs"]["content"]]
        return tokens, result["timings"]["predicted_per_second"]

    def hidden_states(self, ids: list[int]) -> np.ndarray:
        """llama.cpp's final hidden state (after the output norm, before the output layer) of every position."""
        if not self.embeddings:
            raise SlimformerError("hidden states need a LlamaCpp opened with embeddings=True")
        # The binding's embeddings call is the OpenAI-style endpoint, which refuses per-token output; the server's
        # native /embedding endpoint (on the address the binding listens on) returns it.
        request = urllib.request.Request(self.server.listening_address.rstrip("/") + "/embedding",
                                         data=json.dumps({"content": list(ids)}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request) as response:
            result = json.loads(response.read())
        if isinstance(result, dict) and "error" in result:
            raise SlimformerError(f"llama.cpp: {result['error']}")
        return np.asarray(result[0]["embedding"], dtype=np.float32)
