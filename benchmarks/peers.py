"""The reference tools on the quantization protocol, run in their own environment (their pins differ from slimformer's).

llm-compressor's ``GPTQModifier`` and ``AWQModifier`` (W4A16, symmetric, group 64, ``lm_head`` left
in float) on the same float SmolLM2 checkpoint and the same 32 × 2048 calibration windows; the
compressed-tensors checkpoints they write are then measured by ``quantization.py`` with
slimformer's perplexity. torchao's CPU weight-only int4 (``PrototypeInt4WeightOnlyConfig``, the
tinygemm CPU kernel) and int8 (``Int8WeightOnlyConfig``), eager mode, timed against the fp32
model in this process, alternating, with the same decode loop as slimformer's.

    /path/to/peer-venv/bin/python benchmarks/peers.py --what gptq --model DIR --samples samples.pt --out DIR
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _scheme():
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=4, type="int", symmetric=True,
                                                                            strategy="group", group_size=64))


def llm_compressor(what: str, model_dir: str, samples: torch.Tensor, out: Path) -> dict:
    """Quantize with llm-compressor's oneshot (its defaults otherwise) and save the compressed checkpoint."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if what == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        recipe = GPTQModifier(config_groups={"group_0": _scheme()}, ignore=["lm_head"], block_size=128,
                              dampening_frac=0.01)
    else:
        from llmcompressor.modifiers.awq import AWQModifier
        from llmcompressor.pipelines.cache import IntermediatesCache

        if not torch.cuda.is_available():  # llm-compressor 0.14 AWQ pins host memory, which needs an accelerator
            IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None

        recipe = AWQModifier(config_groups={"group_0": _scheme()}, ignore=["lm_head"])
    data = Dataset.from_dict({"input_ids": samples.tolist(), "attention_mask": torch.ones_like(samples).tolist()})
    start = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=samples.shape[0],
            max_seq_length=samples.shape[1])
    seconds = time.perf_counter() - start
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    return {"what": what, "seconds": seconds, "peak_rss_gib": _peak_rss_gib(), "checkpoint": str(out),
            "recipe": str(recipe)}


@torch.no_grad()
def _decode_steps(model, prompt: torch.Tensor, new_tokens: int) -> list[float]:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(new_tokens):
        start = time.perf_counter()
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        times.append(time.perf_counter() - start)
        token = out.logits[:, -1:].argmax(-1)
    return times


def torchao_speed(model_dir: str, ids: torch.Tensor, repeats: int = 3) -> dict:
    """Decode tokens/s and 2048-token prefill seconds of torchao int4/int8 weight-only against fp32, alternating."""
    from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    from transformers import AutoModelForCausalLM

    def load(dtype=torch.float32):
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()

    # tinygemm's CPU kernel takes bfloat16 activations: the int4 model is loaded and run in bfloat16 end to end, as
    # torchao's CPU examples do
    models = {"dense": load(), "torchao int4 g64": load(torch.bfloat16), "torchao int8": load()}
    quantize_(models["torchao int4 g64"], PrototypeInt4WeightOnlyConfig(group_size=64, set_inductor_config=False))
    quantize_(models["torchao int8"], Int8WeightOnlyConfig(set_inductor_config=False))
    steps = {k: [] for k in models}
    prefill = {k: [] for k in models}
    with torch.no_grad():
        for name, model in models.items():  # warm-up
            _decode_steps(model, ids[:, :128], 4)
        for _ in range(repeats):
            for name, model in models.items():
                steps[name] += _decode_steps(model, ids[:, :128], 32)
                start = time.perf_counter()
                model(input_ids=ids, use_cache=False)
                prefill[name].append(time.perf_counter() - start)
    return {name: {"decode_tok_s": 1 / statistics.median(steps[name]), "prefill_s": statistics.median(prefill[name])}
            for name in models}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--what", required=True, choices=["gptq", "awq", "torchao"])
    parser.add_argument("--model", required=True, help="float SmolLM2 checkpoint folder")
    parser.add_argument("--samples", required=True, help="torch file with 'samples' (n × 2048) and 'ids' (1 × 2048)")
    parser.add_argument("--out", default=None, help="folder for the compressed checkpoint")
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = torch.load(args.samples)
    if args.what == "torchao":
        result = {"what": "torchao", "speed": torchao_speed(args.model, data["ids"])}
    else:
        result = llm_compressor(args.what, args.model, data["samples"], Path(args.out))
    import llmcompressor
    import torchao
    import transformers

    result["versions"] = {"llmcompressor": llmcompressor.__version__, "torchao": torchao.__version__,
                          "transformers": transformers.__version__, "torch": torch.__version__}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
