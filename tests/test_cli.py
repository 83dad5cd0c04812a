"""The command line: a real run on a tiny saved model, and one clear line for bad input."""

import json
import subprocess
import sys

import pytest

from conftest import assert_ppl_close
from slimformer.cli import main
from slimformer.data import load_text, tokenize
from slimformer.evaluation import perplexity


def test_eval_prints_a_table_and_writes_json(saved_tiny, tmp_path, capsys):
    path, text = saved_tiny
    out = tmp_path / "r" / "eval.json"
    assert main(["eval", str(path), "--ppl", str(text), "--seqlen", "32", "--out", str(out)]) == 0
    result = json.loads(out.read_text())["perplexity"][str(text)]
    assert result["windows"] == 12  # 400 tokens // 32
    stdout = capsys.readouterr().out
    assert f"{result['perplexity']:.3f}" in stdout
    from slimformer import load_model

    loaded = load_model(str(path))
    expected = perplexity(loaded.model, tokenize(loaded.tokenizer, load_text(str(text))), seqlen=32, progress=False)
    assert_ppl_close(result["perplexity"], expected.perplexity)


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "no-such-model"], "unknown model 'no-such-model'"),
        (["eval", "{model}", "--ppl", "c5"], "unknown data source 'c5'"),
        (["eval", "{model}", "--ppl", "{text}", "--seqlen", "4096"], "seqlen 4096 is larger than the model allows"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(saved_tiny, capsys, args, message):
    path, text = saved_tiny
    args = [a.format(model=path, text=text) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("slimformer: error: ") and message in err[0]


def test_missing_data_directory_through_the_command(saved_tiny, tmp_path):
    path, _ = saved_tiny
    env = {"SLIMFORMER_DATA": str(tmp_path / "absent"), "PATH": ""}
    proc = subprocess.run([sys.executable, "-m", "slimformer.cli", "eval", str(path)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"slimformer: error: data directory {tmp_path / 'absent'} (from $SLIMFORMER_DATA) does not exist"


def test_eval_zero_shot_and_lm_eval_on_a_local_task(saved_tiny, tmp_path, capsys):
    pytest.importorskip("lm_eval", reason="the lm-eval extra is not installed")
    from slimformer.evaluation import write_task_yaml

    path, _ = saved_tiny
    task = tmp_path / "words.jsonl"
    task.write_text("\n".join(json.dumps({"context": f"w{i} w{i + 1}", "choices": [f"w{i + 2}", f"w{i + 9}"],
                                          "gold": i % 2}) for i in range(12)) + "\n")
    write_task_yaml(task, tmp_path / "tasks", "words")
    out = tmp_path / "eval.json"
    assert main(["eval", str(path), "--tasks", str(task), "--lm-eval", "words",
                 "--lm-eval-include", str(tmp_path / "tasks"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    ours, harness = result["tasks"][str(task)], result["lm_eval"]["results"]["words"]
    assert ours["examples"] == 12 and ours["acc"] == pytest.approx(harness["acc"])
    assert "zero-shot tasks" in capsys.readouterr().out


def test_eval_bad_task_file_names_file_and_line(saved_tiny, tmp_path, capsys):
    path, _ = saved_tiny
    task = tmp_path / "bad.jsonl"
    task.write_text('{"context": "w1", "choices": ["w2"], "gold": 0}\n{"context": "w1", "gold": 0}\n')
    assert main(["eval", str(path), "--tasks", str(task)]) == 2
    err = capsys.readouterr().err
    assert str(task) in err and ":2" in err
    assert main(["eval", str(path), "--tasks", "hellaswagg"]) == 2
    assert "hellaswagg" in capsys.readouterr().err


@pytest.mark.parametrize(("module", "argv", "extra"), [
    ("lm_eval", ["eval", "{path}", "--lm-eval", "piqa", "--out", "{tmp}/e.json"], "lm-eval"),
    ("ray", ["search", "{path}", "--task", "text:{text}", "--backend", "ray", "--trials", "2", "--nsamples", "2",
             "--seqlen", "16", "--out", "{tmp}/r"], "ray"),
])
def test_a_missing_extra_is_named(saved_tiny, tmp_path, capsys, monkeypatch, module, argv, extra):
    path, text = saved_tiny
    monkeypatch.setitem(sys.modules, module, None)  # as if the extra were not installed
    assert main([a.format(path=path, text=text, tmp=tmp_path) for a in argv]) == 2
    assert f"needs the '{extra}' extra: pip install 'slimformer[{extra}]'" in capsys.readouterr().err


def test_the_parser_names_equal_the_library_lists():
    """The CLI builds its parser without importing the library (a fast --help); its names must still agree."""
    from slimformer import cli
    from slimformer.calibration import PROPAGATE
    from slimformer.data import SOURCES_HELP, TASKS_HELP
    from slimformer.data.glue import GLUE_TASKS
    from slimformer.models import ALIASES, BOS_MODES
    from slimformer.models.loading import DEFAULT_MODEL, DTYPES
    from slimformer.search.objectives import OBJECTIVES
    from slimformer.search.space import SPACES
    from slimformer.search.strategies import BACKENDS, STRATEGIES

    assert cli.ALIASES == tuple(ALIASES) and cli.ALIASES[0] == DEFAULT_MODEL
    assert (cli.DTYPES, cli.BOS_MODES, cli.PROPAGATE) == (tuple(DTYPES), BOS_MODES, PROPAGATE)
    assert (cli.SPACES, cli.OBJECTIVES, cli.STRATEGIES, cli.BACKENDS) == (SPACES, OBJECTIVES, STRATEGIES, BACKENDS)
    assert cli.GLUE_TASKS == tuple(GLUE_TASKS)
    from slimformer.methods.quantization import AWQConfig, GPTQConfig, RTNConfig
    from slimformer.models.quantizer import BITS

    assert cli.QUANT_BITS == BITS and cli.QUANT_METHODS == (RTNConfig.method, GPTQConfig.method, AWQConfig.method)
    assert (cli.SOURCES_HELP, cli.TASKS_HELP) == (SOURCES_HELP, TASKS_HELP)
    from slimformer.cli import options
    from slimformer.methods.distill_math import KD_LOSSES

    assert options.KD_LOSSES == KD_LOSSES


def test_help_and_argument_errors_import_no_heavy_library():
    code = ("import sys; from slimformer.cli import build_parser; build_parser(); "
            "print(sorted({'torch', 'transformers', 'ray', 'optuna', 'lm_eval'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _defaults(verb: str) -> dict:
    from slimformer.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[verb]
    return {a.dest: a.default for a in sub._actions}


def _field(cls, name):
    import dataclasses

    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return field.default if field.default is not dataclasses.MISSING else field.default_factory()


def test_every_option_default_equals_its_library_default():
    """The parser holds plain values (a fast --help); each must equal the default it stands for."""
    import inspect

    from slimformer.evaluation import run_glue
    from slimformer.methods import (AWQConfig, DistillConfig, FinetuneConfig, GPTQConfig, LoRAConfig, MagnitudeConfig,
                                    RTNConfig, SLEBConfig, SparseGPTConfig, WandaConfig)
    from slimformer.recipes import Calibration
    from slimformer.search.structural import SearchConfig

    checks = {
        "prune": {"sparsity": (WandaConfig, "sparsity"), "propagate": (WandaConfig, "propagate"),
                  "batch_size": (WandaConfig, "batch_size"), "scope": (MagnitudeConfig, "scope"),
                  "rounds": (MagnitudeConfig, "rounds"), "round_steps": (MagnitudeConfig, "finetune_steps"),
                  "blocksize": (SparseGPTConfig, "blocksize"), "percdamp": (SparseGPTConfig, "percdamp"),
                  "finetune_lr": (FinetuneConfig, "lr"), "finetune_seqlen": (FinetuneConfig, "seqlen"),
                  "finetune_data": (FinetuneConfig, "data"),
                  "calib": (Calibration, "source"), "nsamples": (Calibration, "nsamples"),
                  "seqlen": (Calibration, "seqlen")},
        "remove-blocks": {"protect": (SLEBConfig, "protect"), "batch_size": (SLEBConfig, "batch_size"),
                          "calib": (Calibration, "source"), "seqlen": (Calibration, "seqlen")},
        "quantize": {"bits": (RTNConfig, "bits"), "group_size": (RTNConfig, "group_size"),
                     "head_bits": (RTNConfig, "head_bits"), "blocksize": (GPTQConfig, "blocksize"),
                     "percdamp": (GPTQConfig, "percdamp"), "act_order": (GPTQConfig, "act_order"),
                     "then": (AWQConfig, "then"), "batch_size": (GPTQConfig, "batch_size"),
                     "calib": (Calibration, "source"), "nsamples": (Calibration, "nsamples"),
                     "seqlen": (Calibration, "seqlen")},
        "recover": {**{name: (DistillConfig, name) for name in ("tokens", "data", "seqlen", "batch_size", "heldout",
                                                                "eval_every", "patience", "seed", "loss", "temperature",
                                                                "top_k", "hidden_weight", "cache", "teacher")},
                    "lora_rank": (LoRAConfig, "lora_rank"), "lora_alpha": (LoRAConfig, "lora_alpha"),
                    "lora_targets": (LoRAConfig, "lora_targets")},
        "search": {name: (SearchConfig, name) for name in ("space", "strategy", "trials", "population", "backend",
                                                           "seed", "epochs", "random_subnets", "distill", "sampling",
                                                           "supernet_init", "train_limit", "max_length")},
    }
    checked = 0
    for verb, options in checks.items():
        defaults = _defaults(verb)
        for dest, (cls, name) in options.items():
            expected = _field(cls, name)
            got = tuple(defaults[dest]) if isinstance(expected, tuple) else defaults[dest]
            assert got == expected, f"{verb} --{dest.replace('_', '-')}: {got!r} != {cls.__name__}.{name} {expected!r}"
            checked += 1
    assert tuple(_defaults("search")["objectives"].split(",")) == _field(SearchConfig, "objectives")
    glue = _defaults("glue")
    for name, parameter in inspect.signature(run_glue).parameters.items():
        if name in glue and parameter.default is not inspect.Parameter.empty:
            assert glue[name] == parameter.default, f"glue --{name}"
            checked += 1
    assert checked > 30


def test_bad_task_files_and_glue_folders_give_one_line_and_exit_2(saved_tiny, tmp_path, capsys, monkeypatch):
    path, _ = saved_tiny
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"question": "w1", "answer": "w2"}) + "\n")
    assert main(["eval", str(path), "--tasks", str(odd), "--out", str(tmp_path / "e.json")]) == 2
    (tmp_path / "glue" / "RTE").mkdir(parents=True)
    (tmp_path / "glue" / "RTE" / "train.tsv").write_text("index\tpremise\thypothesis\tlabel\n0\tw1\tw2\tentailment\n")
    (tmp_path / "glue" / "RTE" / "dev.tsv").write_text("index\tpremise\thypothesis\tlabel\n0\tw1\tw2\tentailment\n")
    monkeypatch.setenv("SLIMFORMER_DATA", str(tmp_path))
    assert main(["glue", str(path), "--task", "rte"]) == 2
    assert main(["glue", str(path), "--task", "mnli-x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("slimformer: error: ") for line in err)
    assert f"{odd}:1: fields ['answer', 'question'] match no task layout" in err[0]
    assert "RTE/train.tsv:1: the header has no column 'sentence1'" in err[1]
    assert "unknown GLUE task 'mnli-x'; choose one of cola, sst2" in err[2]
    assert not (tmp_path / "e.json").exists()
