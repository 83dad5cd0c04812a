"""End-to-end jobs behind the CLI verbs: load, calibrate, compress, measure, save — checking input first."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from slimformer.data import load_text, sample_windows, tokenize
from slimformer.errors import SlimformerError
from slimformer.files import write_json
from slimformer.evaluation import perplexity
from slimformer.machine import machine_info
from slimformer.methods import apply
from slimformer.methods.finetune import FinetuneConfig
from slimformer.models import load_model, save_model
from slimformer.report import build_report


@dataclass
class Calibration:
    """Where calibration samples come from: ``n × seqlen`` seeded windows of a named source."""

    source: str = "wikitext2:valid"
    n: int = 32
    seqlen: int = 2048
    seed: int = 0


@dataclass
class CompressJob:
    """One compression run: the model, a method config, calibration, optional fine-tune, measurement, outputs."""

    model: str
    config: object
    calibration: Calibration = field(default_factory=Calibration)
    finetune: FinetuneConfig | None = None
    ppl_windows: int = 0
    out: str | None = None
    sparse_out: str | None = None
    overwrite: bool = False
    dtype: str = "float32"
    device: str = "cpu"
    bos: str = "auto"  # which windows start with the tokenizer's BOS (slimformer.models.BOS_MODES)


def folder_size(path: str | Path) -> int:
    """Bytes of the weight files in a saved model folder."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def _check_outputs(job: CompressJob) -> None:
    for out in (job.out, job.sparse_out):
        if out and Path(out).exists() and not job.overwrite:
            raise SlimformerError(f"output '{out}' exists; choose another path or pass --overwrite")


def _ppl(loaded, ids: torch.Tensor | None, windows: int, bos: int | None) -> float | None:
    if ids is None:
        return None
    return perplexity(loaded.model, ids, seqlen=2048, windows=windows, bos=bos).perplexity


def run_compress(job: CompressJob) -> dict:
    """Compress ``job.model`` with ``job.config``; measure, save and return a report (also saved as slimformer.json)."""
    _check_outputs(job)
    calib = job.calibration
    text = load_text(calib.source)  # a missing or empty source fails before the model loads
    loaded = load_model(job.model, dtype=job.dtype, device="cpu")
    needs_samples = getattr(job.config, "needs_samples", True) or job.finetune is not None
    bos = loaded.window_bos(job.bos)
    samples = sample(loaded.tokenizer, text, calib, bos) if needs_samples else None
    test_ids = tokenize(loaded.tokenizer, load_text("wikitext2:test")) if job.ppl_windows else None  # once
    report = {"model": job.model, "calibration": asdict(calib), "ppl_windows": job.ppl_windows}
    report["ppl_before"] = _ppl(loaded, test_ids, job.ppl_windows, bos)
    result = apply(loaded.adapter, job.config, samples)
    report["result"] = asdict(result)
    report["ppl_after"] = _ppl(loaded, test_ids, job.ppl_windows, bos)
    if job.finetune:
        report["finetune"] = asdict(apply(loaded.adapter, job.finetune, samples))
        report["ppl_after_finetune"] = _ppl(loaded, test_ids, job.ppl_windows, bos)
    report["machine"] = machine_info()
    _save(loaded, job, report)
    return report


def sample(tokenizer, text: str, calib: Calibration, bos: int | None = None) -> torch.Tensor:
    """Calibration windows from an already loaded text."""
    return sample_windows(tokenize(tokenizer, text), calib.n, calib.seqlen, calib.seed, bos=bos)


def _save(loaded, job: CompressJob, report: dict) -> None:
    sizes = {}
    if job.out:
        save_model(loaded.model, loaded.tokenizer, job.out, overwrite=job.overwrite)
        sizes["dense"] = folder_size(job.out)
    if job.sparse_out:
        structure = getattr(job.config, "pattern", None) or "unstructured"
        save_model(loaded.model, loaded.tokenizer, job.sparse_out, overwrite=job.overwrite, sparse=structure)
        sizes["sparse-bitmask"] = folder_size(job.sparse_out)
    report["size_bytes"] = sizes
    for out in (job.out, job.sparse_out):
        if out:
            write_json(Path(out) / "slimformer.json", report)
            build_report(out)
