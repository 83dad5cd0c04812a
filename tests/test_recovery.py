"""Recovery: KD losses against direct formulas, the chunked head loss, block mapping, LoRA merging, the training loop."""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import VOCAB, random_ids, tiny_model, tiny_tokenizer
from slimformer import SlimformerError, get_adapter, load_model, save_model
from slimformer.cli import main
from slimformer.methods import DistillConfig, FinetuneConfig, LoRAConfig, MagnitudeConfig, RTNConfig, apply
from slimformer.methods.base import select_linears
from slimformer.methods.distill_math import chunked_head_loss, hidden_loss, kd_divergence, teacher_topk
from slimformer.methods.recovery import hidden_pairs
from slimformer.methods.training import _attach_lora, _merge_lora, _zero_masks, split_windows
from slimformer.models.adapters import weight_matrix
from slimformer.models.quantized import QuantizedLinear, quantized_modules
from slimformer.models.surgery import remove_blocks

TRAIN = dict(seqlen=16, batch_size=2, heldout=2, eval_every=2, data="random")


def logits_pair(n=6, v=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * 3, torch.randn(n, v, generator=g) * 3


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_vocabulary_kd_equals_the_direct_divergences(temperature):
    student, teacher = logits_pair()
    values, index, lse = teacher_topk(teacher, k=student.shape[1], temperature=temperature)
    log_q, log_p = F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1)
    p, q = log_p.exp(), log_q.exp()
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="sum") * temperature**2
    reverse = (q * (log_q - log_p)).sum() * temperature**2
    m = (p + q) / 2
    js = (0.5 * (p * (log_p - m.log())).sum() + 0.5 * (q * (log_q - m.log())).sum()) * temperature**2
    for kind, expected in (("kl", kl), ("reverse_kl", reverse), ("js", js)):
        got = kd_divergence(student, values, index, lse, kind, temperature)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_top_k_kd_equals_the_divergence_of_the_coarsened_distributions():
    student, teacher = logits_pair(n=5, v=30, seed=1)
    k, t = 4, 1.5
    values, index, lse = teacher_topk(teacher, k, t)
    expected = torch.zeros(())
    for row in range(student.shape[0]):  # slow reference: build the k + 1 buckets by hand
        p, q = F.softmax(teacher[row] / t, -1), F.softmax(student[row] / t, -1)
        top = teacher[row].topk(k).indices
        rest = torch.ones(30, dtype=torch.bool)
        rest[top] = False
        pb = torch.cat([p[top], p[rest].sum()[None]])
        qb = torch.cat([q[top], q[rest].sum()[None]])
        expected += (pb * (pb.log() - qb.log())).sum()
    got = kd_divergence(student, values, index, lse, "kl", t)
    torch.testing.assert_close(got, expected * t**2, rtol=1e-5, atol=1e-6)
    full = kd_divergence(student, *teacher_topk(teacher, 30, t), "kl", t)
    assert got < full  # coarsening loses information: a lower bound of the full divergence


@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "js"])
@pytest.mark.parametrize("k", [5, VOCAB])
def test_a_student_equal_to_its_teacher_has_zero_kd_loss_and_gradient(kind, k):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, VOCAB, bias=False)
    hidden = torch.randn(12, 16, requires_grad=True)
    with torch.no_grad():
        values, index, lse = teacher_topk(head(hidden), k, 2.0)

    def loss(logits, a, b):
        return kd_divergence(logits, values[a:b], index[a:b], lse[a:b], kind, 2.0)

    total = chunked_head_loss(hidden, head, loss, list(head.parameters()), chunk=5)
    total.backward()
    assert abs(total.item()) < 1e-5
    assert hidden.grad.abs().max() < 1e-5 and head.weight.grad.abs().max() < 1e-5


def test_chunked_head_loss_matches_the_full_logits_loss_and_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    teacher = teacher_topk(torch.randn(23, 50), 7, 1.0)
    weight = torch.tensor(1.7)

    def chunk(logits, a, b):
        return F.cross_entropy(logits, targets[a:b], reduction="sum") + kd_divergence(
            logits, teacher[0][a:b], teacher[1][a:b], teacher[2][a:b])

    got = chunked_head_loss(hidden * 1.0, head, chunk, list(head.parameters()), chunk=6) * weight
    got.backward()
    grads = hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()
    hidden.grad, head.weight.grad, head.bias.grad = None, None, None
    expected = chunk(head(hidden), 0, 23) * weight
    expected.backward()
    torch.testing.assert_close(got, expected)
    for a, b in zip(grads, (hidden.grad, head.weight.grad, head.bias.grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_hidden_losses():
    t = torch.randn(2, 5, 8) * 10
    assert hidden_loss(t.clone(), t, "mse") == 0 and hidden_loss(t, t, "cosine").abs() < 1e-6
    torch.testing.assert_close(hidden_loss(torch.zeros_like(t), t, "mse"), torch.tensor(1.0))
    assert hidden_loss(2 * t, t, "cosine").abs() < 1e-6 < hidden_loss(2 * t, t, "mse")


def test_block_mapping_follows_removed_blocks_across_removals_and_saves(tmp_path):
    student = get_adapter(tiny_model("llama"))
    teacher = get_adapter(tiny_model("llama"))
    assert student.block_origin() == [0, 1, 2]
    remove_blocks(student, [1])
    assert student.block_origin() == [0, 2]
    assert hidden_pairs(student, teacher, 4) == [(0, 0), (1, 2)]
    path = save_model(student.model, tiny_tokenizer(), tmp_path / "s")
    reloaded = load_model(str(path)).adapter
    assert reloaded.block_origin() == [0, 2]
    remove_blocks(reloaded, [0])  # a second removal counts in the new indices: original block 0 goes
    assert reloaded.block_origin() == [2]
    remove_blocks(teacher, [2])
    with pytest.raises(SlimformerError, match=r"original block\(s\) \[2\]"):
        hidden_pairs(reloaded, teacher, 4)


def test_training_windows_are_split_and_small_texts_refused():
    ids = torch.arange(400)[None]
    train, held = split_windows(ids, FinetuneConfig(tokens=64, **TRAIN))
    assert train.shape == (23, 16) and held.shape == (2, 16)
    assert not set(map(tuple, train.tolist())) & set(map(tuple, held.tolist()))
    with pytest.raises(SlimformerError, match=r"passes over the 368 training tokens.*memorises"):
        split_windows(ids, FinetuneConfig(tokens=4000, **TRAIN))
    assert split_windows(ids, FinetuneConfig(tokens=4000, max_epochs=11, **TRAIN))[0].shape[0] == 23


def test_distillation_needs_a_teacher_and_a_decoder():
    with pytest.raises(SlimformerError, match="needs a teacher"):
        apply(get_adapter(tiny_model("llama")), DistillConfig(tokens=64, **TRAIN), random_ids(1, 400))
    with pytest.raises(SlimformerError, match="encoder"):
        apply(get_adapter(tiny_model("bert")), FinetuneConfig(tokens=64, **TRAIN), random_ids(1, 400))
    with pytest.raises(SlimformerError, match="not all zero"):
        DistillConfig(kd_weight=0)


def test_lora_merge_gives_the_logits_of_the_unmerged_model():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    peft_model = _attach_lora(adapter, LoRAConfig(lora_rank=4, lora_targets=("q", "down")))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()  # peft starts B at zero: give the adapters something to merge
    ids = random_ids(2, 12)
    model.eval()  # peft leaves its dropout in training mode
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
    assert _merge_lora(peft_model, None)["merged_modules"] == 2 * 3
    assert all(type(m) is torch.nn.Linear for m in select_linears(adapter).values())
    assert not any("lora" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, unmerged, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("masked", [True, False])
def test_masked_merge_keeps_the_2_4_pattern_and_an_unmasked_one_does_not(masked):
    model = tiny_model("llama")
    adapter = get_adapter(model)
    apply(adapter, MagnitudeConfig(pattern="2:4"))
    zeros = {n: weight_matrix(m) == 0 for n, m in select_linears(adapter).items()}
    config = LoRAConfig(tokens=64, lr=1e-2, masked_merge=masked, **TRAIN)
    result = apply(adapter, config, random_ids(1, 600))
    changed = [n for n, m in select_linears(adapter).items() if not torch.equal(weight_matrix(m) == 0, zeros[n])]
    assert result.summary["merged_modules"] == 7 * 3
    if masked:
        assert not changed and result.summary["masked_weights"] == sum(int(z.sum()) for z in zeros.values())
        for m in select_linears(adapter).values():
            groups = (weight_matrix(m) != 0).reshape(-1, 4).sum(1)
            assert (groups <= 2).all()
    else:
        assert changed  # the test can fail: without the mask the update fills pruned weights
    assert "heldout_unmerged" in result.summary and "heldout_merged" in result.summary


def test_full_training_keeps_zeros_lowers_the_heldout_loss_and_keeps_the_best_step():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    apply(adapter, MagnitudeConfig(sparsity=0.5))
    zeros = _zero_masks(adapter)
    text = torch.arange(2400)[None] % 7  # a learnable pattern
    result = apply(adapter, FinetuneConfig(tokens=1600, lr=3e-3, patience=0, **TRAIN), text)
    s = result.summary
    assert s["heldout_best"] < s["heldout_before"] and s["best_step"] > 0
    assert {n: z for n, z in _zero_masks(adapter).items()}.keys() == zeros.keys()
    assert all(torch.equal(_zero_masks(adapter)[n], z) for n, z in zeros.items())
    assert not model.training and all(p.requires_grad for p in model.parameters())
    # A learning rate that only harms: training stops early and the model is left as it came.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    harmful = apply(adapter, FinetuneConfig(tokens=1600, lr=30.0, patience=2, **TRAIN), torch.randint(0, 64, (1, 2400)))
    assert harmful.summary["best_step"] == 0 and harmful.summary["stopped_early"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_distillation_with_hidden_states_from_a_deeper_teacher(tmp_path):
    teacher = tiny_model("llama")
    path = save_model(teacher, tiny_tokenizer(), tmp_path / "t")
    student = tiny_model("llama")
    adapter = get_adapter(student)
    remove_blocks(adapter, [1])
    config = DistillConfig(tokens=320, teacher=str(path), top_k=8, hidden_weight=1.0, hidden_blocks=2,
                           cache=str(tmp_path / "cache"), lr=1e-3, patience=0, **TRAIN)
    s = apply(adapter, config, random_ids(1, 800)).summary
    assert s["hidden_pairs"] == [[0, 0], [1, 2]]
    per_window = 15 * (8 * 4 + 8 * 4 + 4) + 2 * 16 * 32 * 2  # top-k values, indices, lse; two blocks in bfloat16
    assert s["teacher_cache_bytes"] == 10 * 2 * per_window
    assert not any((tmp_path / "cache").iterdir())  # the file cache goes when the step ends
    assert len(s["history"]) == 1 + 10 // 2


def test_a_quantized_model_trains_over_its_grid_and_stays_quantized():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    apply(adapter, RTNConfig(bits=4, group_size=16))
    grids = {n: (m.weight_scale.clone(), m.weight_zero_point.clone()) for n, m in quantized_modules(model).items()}
    for config in (FinetuneConfig(tokens=64, lr=1e-2, patience=0, **TRAIN),
                   LoRAConfig(tokens=64, lr=1e-2, patience=0, **TRAIN)):
        s = apply(adapter, config, random_ids(1, 600)).summary
        assert "heldout_float" in s and "heldout_requantized" in s
        modules = quantized_modules(model)
        assert modules.keys() == grids.keys() and all(isinstance(m, QuantizedLinear) for m in modules.values())
        for n, (scale, zero) in grids.items():  # back on the same grid
            assert torch.equal(modules[n].weight_scale, scale) and torch.equal(modules[n].weight_zero_point, zero)


def test_rounding_zeros_of_a_quantized_model_are_trained_and_pruned_zeros_kept():
    """int4 rounding puts some weights on the zero point: they are not a pattern and train; the zeros
    of a 2:4-pruned, then quantized model are one and stay."""
    from slimformer.methods import WandaConfig
    from slimformer.models.quantized import dequantize_model

    rounded = tiny_model("llama")
    apply(get_adapter(rounded), RTNConfig(bits=4, group_size=None))
    names = set(quantized_modules(rounded))
    dequantize_model(rounded)
    linears = select_linears(get_adapter(rounded))
    assert any((linears[n].weight == 0).any() for n in names)  # the test can fail: there are zeros to ignore
    assert _zero_masks(get_adapter(rounded), names) == {}
    pruned = tiny_model("llama")
    apply(get_adapter(pruned), WandaConfig(pattern="2:4"), random_ids(2, 16))
    apply(get_adapter(pruned), RTNConfig(bits=4, group_size=None))
    dequantize_model(pruned)
    masks = _zero_masks(get_adapter(pruned), names)
    assert masks.keys() == names and all(z.float().mean() >= 0.5 for z in masks.values())


def test_no_regrid_leaves_the_trained_float_weights():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    apply(adapter, RTNConfig(bits=4, group_size=16))
    s = apply(adapter, FinetuneConfig(tokens=64, lr=1e-2, patience=0, regrid=False, **TRAIN), random_ids(1, 600)).summary
    assert not quantized_modules(model) and "heldout_requantized" not in s
    assert s["heldout_after"] == s["heldout_float"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_quantized_model_recovers_on_a_gpu_and_decodes_on_the_cpu_kernel_after():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    apply(adapter, RTNConfig(bits=4, group_size=None))
    kernels = {n: m.kernel for n, m in quantized_modules(model).items()}
    for config in (FinetuneConfig(tokens=64, lr=1e-2, patience=0, device="cuda", **TRAIN),
                   LoRAConfig(tokens=64, lr=1e-2, patience=0, device="cuda", **TRAIN)):
        s = apply(adapter, config, random_ids(1, 600)).summary
        assert torch.isfinite(torch.tensor([s["heldout_float"], s["heldout_requantized"]])).all()
        modules = quantized_modules(model)
        assert {n: m.kernel for n, m in modules.items()} == kernels and "int4" in kernels.values()
        assert {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()} == {"cpu"}


def test_cli_recover_writes_a_stock_model_and_refuses_kd_without_teacher(saved_tiny, tmp_path, capsys):
    path, text = saved_tiny
    args = ["recover", str(path), "--data", str(text), "--tokens", "0.2k", "--seqlen", "16", "--batch-size", "2",
            "--heldout", "2", "--eval-every", "2", "--ppl-windows", "0"]
    assert main([*args, "--out", str(tmp_path / "x")]) == 2
    assert "give --teacher" in capsys.readouterr().err
    out = tmp_path / "o"
    assert main([*args, "--method", "kd+lora", "--teacher", str(path), "--lora-rank", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "held-out loss" in printed and "teacher cache" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["steps"][0]["training"]["heldout"] and "Recovery training" in (out / "report.html").read_text()
    from transformers import AutoModelForCausalLM

    stock = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n in stock.state_dict())


@pytest.mark.parametrize("rank", [0, 4])
def test_activation_checkpointing_changes_memory_not_the_result(rank):
    runs = []
    for checkpointing in (False, True):
        adapter = get_adapter(tiny_model("llama"))
        config = LoRAConfig(tokens=128, lr=1e-2, lora_rank=rank, lora_dropout=0.0, checkpointing=checkpointing, **TRAIN)
        runs.append(apply(adapter, config, random_ids(1, 600)).summary["history"])
    assert len(runs[0]) == len(runs[1]) == 3  # step 0, then every 2 of 4 steps
    for a, b in zip(*runs):
        assert a.get("loss", 0) == pytest.approx(b.get("loss", 0), rel=1e-4)
        assert a["heldout"] == pytest.approx(b["heldout"], rel=1e-4)
