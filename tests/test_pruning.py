"""Pruning methods on tiny models: a case table crossed with invariant tests."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import assert_close_scaled, random_ids, tiny_model, tiny_tokenizer
from slimformer import SlimformerError, get_adapter, load_model, save_model
from slimformer.cli import main
from slimformer.methods import FinetuneConfig, MagnitudeConfig, SparseGPTConfig, WandaConfig, apply, select_linears
from slimformer.methods import pruning_math as pm
from slimformer.methods.obs import sparsegpt_prune
from slimformer.models import weight_matrix

CASES = {
    "magnitude-layer": MagnitudeConfig(0.5),
    "magnitude-global": MagnitudeConfig(0.6, scope="global"),
    "magnitude-2:4": MagnitudeConfig(pattern="2:4"),
    "wanda": WandaConfig(0.5),
    "wanda-2:4": WandaConfig(pattern="2:4"),
    "wanda-4:8": WandaConfig(pattern="4:8", propagate="compressed"),
    "sparsegpt": SparseGPTConfig(0.5, blocksize=16),
    "sparsegpt-2:4": SparseGPTConfig(pattern="2:4", propagate="dense"),
}
FAMILIES = ["llama", "gpt2", "opt", "qwen2"]


def pruned(family, config, seed=0):
    model = tiny_model(family)
    adapter = get_adapter(model)
    result = apply(adapter, config, random_ids(4, 16, seed=seed))
    return model, adapter, result


def check_sparsity(config, modules):
    weights = [weight_matrix(m) for m in modules.values()]
    if config.n_m:
        n, m = config.n_m
        for W in weights:
            zeros = (W == 0).reshape(W.shape[0], -1, m).sum(-1)
            assert (zeros == m - n).all()
    elif isinstance(config, WandaConfig):
        for W in weights:
            assert ((W == 0).sum(1) == int(W.shape[1] * config.sparsity)).all()  # per output row
    elif isinstance(config, MagnitudeConfig) and config.scope == "global":
        total = sum(W.numel() for W in weights)
        assert sum(int((W == 0).sum()) for W in weights) == int(total * config.sparsity)
    else:  # per matrix (magnitude) or per column block (SparseGPT): exact up to per-block rounding
        for W in weights:
            assert abs((W == 0).float().mean().item() - config.sparsity) < 0.02


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", CASES)
def test_pruning_invariants(case, family, tmp_path):
    config = CASES[case]
    model, adapter, result = pruned(family, config)
    modules = select_linears(adapter)
    check_sparsity(config, modules)
    assert result.summary["pruned_modules"] == len(modules) == len(result.layers)
    # Same seed, same samples: the same weights (so the same masks).
    again, _, _ = pruned(family, config)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    # The saved model reloads with stock transformers and gives the same logits.
    ids = random_ids(2, 12, seed=9)
    path = save_model(model, None, tmp_path / "m")
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert torch.isfinite(expected).all()
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(path)(input_ids=ids).logits, expected)


def test_head_embeddings_and_ignored_modules_stay_dense():
    dense = tiny_model("llama")
    model, adapter, _ = pruned("llama", WandaConfig(0.5, ignore=("down_proj", "re:.*layers\\.0\\..*")))
    for name, param in model.named_parameters():
        untouched = any(s in name for s in ("down_proj", ".layers.0.", "embed", "norm", "lm_head"))
        same = torch.equal(param, dense.get_parameter(name))
        assert same == untouched, name


def test_targets_by_suffix_and_regex():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    assert set(select_linears(adapter, ("q_proj",))) == {f"model.layers.{i}.self_attn.q_proj" for i in range(3)}
    assert set(select_linears(adapter, ("re:.*mlp\\.(up|gate)_proj",), ("re:.*layers\\.2\\..*",))) == {
        f"model.layers.{i}.mlp.{p}_proj" for i in (0, 1) for p in ("up", "gate")}
    assert set(select_linears(adapter, ("lm_head",))) == {"lm_head"}  # only when asked for
    with pytest.raises(SlimformerError, match="no Linear module matches"):
        select_linears(adapter, ("nothing",))


def block0_inputs(adapter, samples, module):
    """Every input ``module`` of block 0 sees in a dense forward, as one (tokens, in) matrix."""
    seen = []
    handle = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        adapter.model(input_ids=samples)
    handle.remove()
    return torch.cat(seen)


@pytest.mark.parametrize("propagate", ["sequential", "compressed"])
def test_sparsegpt_uses_the_calibration_hessian(propagate):
    """Block 0's first projection equals sparsegpt_prune with H = 2·XᵀX / n from an explicit forward."""
    samples = random_ids(4, 16)
    reference = tiny_model("llama")
    q = get_adapter(reference).linears(get_adapter(reference).blocks[0])["q"]
    X = block0_inputs(get_adapter(reference), samples, q)
    expected, _ = sparsegpt_prune(q.weight.data, 2 * X.T @ X / 4, 0.5, blocksize=16)
    model, adapter, _ = pruned("llama", SparseGPTConfig(0.5, blocksize=16, propagate=propagate))
    assert_close_scaled(adapter.linears(adapter.blocks[0])["q"].weight.data, expected, rel=1e-3)  # OBS updates amplify H's rounding


@pytest.mark.parametrize("propagate", ["sequential", "compressed"])
def test_projections_fed_the_same_input_share_one_statistic(propagate):
    from slimformer.calibration import BlockRunner
    from slimformer.methods.pruning import prune_visitor

    adapter = get_adapter(tiny_model("llama"))
    config = SparseGPTConfig(0.5, propagate=propagate)
    visitor = prune_visitor(adapter, select_linears(adapter), config)
    seen, compress = {}, visitor.compress_fn

    def record(name, module, stats):
        if name.startswith("model.layers.2."):
            seen[name.rsplit(".", 1)[-1]] = (stats, stats.sequences, stats.last_use)  # held: ids are not reused
        compress(name, module, stats)

    visitor.compress_fn = record
    BlockRunner(adapter, random_ids(3, 16), progress=False).run(visitor, propagate=propagate)
    ids = {k: id(v[0]) for k, v in seen.items()}
    assert ids["q_proj"] == ids["k_proj"] == ids["v_proj"] and ids["gate_proj"] == ids["up_proj"]
    assert len(set(ids.values())) == 4  # q/k/v, o, gate/up, down
    assert all(v[1] == 3 for v in seen.values())  # every sample counted once
    last = {k for k, v in seen.items() if v[2]}
    # only the last module fed an input may work in its Hessian, and only once no later module can share it
    assert not last & {"q_proj", "k_proj", "gate_proj"} and "down_proj" in last
    if propagate == "compressed":  # everything observed before anything is compressed
        assert last == {"v_proj", "o_proj", "up_proj", "down_proj"}
    assert not visitor.stats  # each statistic let go once its modules were compressed


def test_full_hessian_mirrors_in_place_and_can_be_taken_once():
    from slimformer.methods.statistics import InputStats, _mirror_upper_, add_upper_gram

    x = torch.randn(40, 2500)
    H = torch.zeros(2500, 2500)
    add_upper_gram(H, x)
    expected = H.triu() + H.triu(1).T
    stats = InputStats(hessian=H, sequences=2)
    full = stats.full_hessian(take=True)
    assert full.data_ptr() == H.data_ptr() and torch.equal(full, expected * (2.0 / 2))
    with pytest.raises(SlimformerError, match="already taken"):
        stats.full_hessian()
    A = torch.randn(7, 7).triu()
    _mirror_upper_(A, band=3)
    assert torch.equal(A, A.T)


@pytest.mark.parametrize("width", [24, 1100])
def test_upper_gram_accumulates_the_gram_matrix(width):
    from slimformer.methods.statistics import add_upper_gram

    x, y = torch.randn(50, width), torch.randn(30, width)
    H = torch.zeros(width, width)
    add_upper_gram(H, x)
    add_upper_gram(H, y)
    assert_close_scaled(H.triu() + H.triu(1).T, x.T @ x + y.T @ y)


def test_wanda_uses_input_norms():
    samples = random_ids(4, 16)
    reference = tiny_model("llama")
    up = get_adapter(reference).linears(get_adapter(reference).blocks[0])["up"]
    X = block0_inputs(get_adapter(reference), samples, up)
    mask = pm.mask_per_row(pm.wanda_scores(up.weight.data, (X * X).sum(0)), 0.5)
    # Two passes: block 0's MLP observes the dense attention output, as in the explicit forward.
    model, adapter, _ = pruned("llama", WandaConfig(0.5, propagate="compressed"))
    assert torch.equal(adapter.linears(adapter.blocks[0])["up"].weight.data == 0, mask)


def test_propagation_modes_differ_after_the_first_block():
    weights = {p: pruned("llama", WandaConfig(0.5, propagate=p))[0].state_dict() for p in ("dense", "compressed")}
    key0, key2 = "model.layers.0.self_attn.q_proj.weight", "model.layers.2.mlp.down_proj.weight"
    assert torch.equal(weights["dense"][key0], weights["compressed"][key0])
    assert not torch.equal(weights["dense"][key2], weights["compressed"][key2])


def test_masked_finetune_keeps_zeros_and_lowers_the_loss():
    model, adapter, _ = pruned("llama", MagnitudeConfig(0.5))
    zeros = {n: weight_matrix(m) == 0 for n, m in select_linears(adapter).items()}
    samples = random_ids(1, 64)
    config = FinetuneConfig(steps=30, lr=1e-2, seqlen=16, batch_size=1, heldout=0, max_epochs=10, data="random")
    history = apply(adapter, config, samples).summary["history"]
    assert history[-1]["loss"] < history[1]["loss"]
    for name, module in select_linears(adapter).items():
        assert torch.equal(weight_matrix(module) == 0, zeros[name]), name
    assert not model.training


def test_iterative_magnitude_reaches_the_target():
    model, adapter, result = pruned("llama", MagnitudeConfig(0.5, rounds=3, finetune_steps=2))
    check_sparsity(MagnitudeConfig(0.5), select_linears(adapter))
    assert result.summary["rounds"] == 3


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: WandaConfig(1.0), "sparsity must be in \\[0, 1\\)"),
        (lambda: WandaConfig(-0.1), "sparsity must be in"),
        (lambda: SparseGPTConfig(pattern="2-4"), "'N:M' such as '2:4'"),
        (lambda: MagnitudeConfig(pattern="4:4"), "0 < N < M"),
        (lambda: WandaConfig(propagate="sideways"), "propagate must be one of"),
        (lambda: MagnitudeConfig(scope="global", pattern="2:4"), "use scope 'layer'"),
    ],
)
def test_bad_configs_are_rejected(make, message):
    with pytest.raises(SlimformerError, match=message):
        make()


def test_pattern_must_divide_the_width_and_samples_must_exist():
    model = tiny_model("llama")  # widths 32 and 48
    with pytest.raises(SlimformerError, match="pattern 3:5 does not divide the width 32"):
        apply(get_adapter(model), WandaConfig(pattern="3:5"), random_ids(2, 8))
    with pytest.raises(SlimformerError, match="calibration set is empty"):
        apply(get_adapter(model), SparseGPTConfig(0.5), torch.zeros(0, 8, dtype=torch.long))
    assert all((p != 0).all() for n, p in model.named_parameters() if "proj" in n)  # nothing was pruned


def test_sparse_storage_is_smaller_and_reloads_exactly(tmp_path):
    model, _, _ = pruned("llama", WandaConfig(0.5))
    dense = save_model(model, tiny_tokenizer(), tmp_path / "dense")
    sparse = save_model(model, tiny_tokenizer(), tmp_path / "sparse", sparse="unstructured")
    config = json.loads((sparse / "config.json").read_text())
    assert config["quantization_config"]["sparsity_config"]["format"] == "sparse-bitmask"
    size = lambda p: (p / "model.safetensors").stat().st_size  # noqa: E731
    assert size(sparse) < 0.85 * size(dense)  # projections at 53%; embeddings and head stay dense
    loaded = load_model(str(sparse))
    ids = random_ids(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, model(input_ids=ids).logits)
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), model.state_dict().values()))


def test_cli_prune_writes_dense_and_sparse_models(saved_tiny, tmp_path, capsys):
    path, text = saved_tiny
    out, sparse = tmp_path / "out", tmp_path / "sparse"
    code = main(["prune", str(path), "--method", "sparsegpt", "--sparsity", "0.5", "--calib", str(text),
                 "--nsamples", "4", "--seqlen", "16", "--out", str(out), "--sparse-out", str(sparse),
                 "--finetune-steps", "2", "--finetune-seqlen", "8", "--finetune-data", str(text)])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "sparsity per layer" in stdout and "down_proj" in stdout
    assert f"report: {out / 'report.html'}" in stdout
    report = json.loads((out / "steps" / "01-sparsegpt" / "slimformer.json").read_text())
    assert report["result"]["summary"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert report["size_bytes"]["sparse-bitmask"] < report["size_bytes"]["dense"]
    assert (out / "steps" / "02-finetune" / "slimformer.json").is_file()
    assert "sparsity_grid" in json.loads((out / "report.json").read_text())["steps"][0]
    stock = AutoModelForCausalLM.from_pretrained(out)
    ids = random_ids(1, 10)
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, load_model(str(sparse)).model(input_ids=ids).logits)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sparsity", "1.5"], "sparsity must be in [0, 1)"),
        (["--pattern", "2:x"], "'N:M' such as '2:4'"),
        (["--pattern", "3:5"], "pattern 3:5 does not divide the width 32"),
        (["--calib", "{empty}"], "is empty"),
        (["--nsamples", "0"], "at least 1"),
    ],
)
def test_cli_prune_bad_input_writes_nothing(saved_tiny, tmp_path, capsys, extra, message):
    path, text = saved_tiny
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "out"
    args = ["prune", str(path), "--method", "wanda", "--calib", str(text), "--nsamples", "2", "--seqlen", "16",
            "--out", str(out)] + [a.format(empty=empty) for a in extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "empty.txt", "m"]
