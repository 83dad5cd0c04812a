"""Quantization: the quantizer's maths, GPTQ against a float64 textbook, AWQ folding, packed kernels, checkpoints, bad input."""

import json

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from conftest import DECODERS, assert_close_scaled, random_ids, tiny_model, tiny_tokenizer
from slimformer import SlimformerError, get_adapter, load_model, save_model
from slimformer.cli import main
from slimformer.methods import AWQConfig, GPTQConfig, RTNConfig, SparseGPTConfig, WandaConfig, apply, select_linears
from slimformer.methods.obs import obs_compress
from slimformer.methods.quantization import _fold
from slimformer.models.adapters import weight_shape
from slimformer.models.quantized import QuantizedEmbedding, QuantizedLinear, float_path, quantized_modules
from slimformer.models.quantizer import QuantScheme, pack, qparams, quantize, quantize_weight, unpack


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# -- the quantizer -------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trip_is_exact(bits):
    scheme = QuantScheme(bits)
    codes = torch.randint(scheme.qmin, scheme.qmax + 1, (24, 96), generator=gen(bits), dtype=torch.int8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (24, 96 * bits // 32)
    assert torch.equal(unpack(packed, bits, codes.shape), codes)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits,group", [(4, 16), (4, None), (8, None), (3, 32)])
def test_round_to_nearest_errors_stay_within_half_a_step_and_zeros_stay_zero(bits, group, symmetric):
    W = torch.randn(16, 64, generator=gen(1))
    W[W.abs() < 0.3] = 0  # pruned weights
    scheme = QuantScheme(bits, group, symmetric)
    q = quantize_weight(W, scheme)
    assert q.codes.min() >= scheme.qmin and q.codes.max() <= scheme.qmax
    step = q.scale.repeat_interleave(q.group, 1)
    deq = q.dequantize()
    clipped = (deq - W).abs() > step / 2 + 1e-6  # only the symmetric top code clips (+max rounds to qmax + 1)
    assert clipped.float().mean() < 0.05
    assert ((deq - W).abs() <= step + 1e-6).all()
    assert (deq[W == 0] == 0).all()  # a zero is its zero point, exactly


def test_symmetric_and_asymmetric_params_follow_the_compressed_tensors_convention():
    w = torch.tensor([[-1.5, 0.0, 3.0, 0.75]])
    half = lambda x: torch.tensor(x).half().item()  # noqa: E731 - scales are float16 values (GGUF stores them so)
    scale, zero = qparams(w, QuantScheme(4, None, True))
    assert scale.item() == half(3.0 / 7.5) and zero.item() == 0
    scale, zero = qparams(w, QuantScheme(4, None, False))
    assert scale.item() == half(4.5 / 15) and zero.item() == -8 - round(-1.5 / half(4.5 / 15))
    assert torch.equal(quantize(w, scale, zero, QuantScheme(4, None, False))[0, :3], torch.tensor([-8.0, -3.0, 7.0]))


def test_mse_clipping_never_increases_the_rounding_error():
    W = torch.randn(32, 64, generator=gen(2))
    W[:, 0] *= 8  # an outlier column: min-max scales waste levels
    scheme = QuantScheme(4, 32)
    plain = (quantize_weight(W, scheme).dequantize() - W).abs().pow(2.4).sum()
    clipped = (quantize_weight(W, scheme, mse=True).dequantize() - W).abs().pow(2.4).sum()
    assert clipped <= plain


def test_group_size_that_does_not_divide_the_width_is_refused():
    with pytest.raises(ValueError, match="group size 64 does not divide the input width 96"):
        quantize_weight(torch.randn(4, 96), QuantScheme(4, 64))
    with pytest.raises(ValueError, match="bits must be one of 2, 3, 4, 8, not 5"):
        QuantScheme(5)


# -- GPTQ against a textbook reference -------------------------------------------------------------
def textbook_gptq(W, H, scheme, order, scale, zero, percdamp=0.01):
    """Column by column in ``order``: round, then spread the error with the explicit inverse Hessian of the rest.

    Float64; the inverse is updated by Gaussian elimination of each fixed column (Frantar et al. 2022, eq. 2-3),
    group scales given (static). No blocks, no Cholesky: an independent derivation of the same update.
    """
    W, H = W.double().clone(), H.double().clone()
    H += percdamp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    group = W.shape[1] // scale.shape[1]
    Q = torch.zeros_like(W)
    remaining = list(order)
    for j in order:
        s, z = scale[:, j // group], zero[:, j // group]
        # rounded in float32, as the code does: the largest |w| of a group sits exactly on ±7.5 steps (a tie)
        q = (((torch.round(W[:, j].float() / s) + z).clamp(scheme.qmin, scheme.qmax) - z) * s).double()
        Q[:, j] = q
        err = (W[:, j] - q) / Hinv[j, j]
        remaining.remove(j)
        W[:, remaining] -= err[:, None] * Hinv[j, remaining][None, :]
        Hinv = Hinv - Hinv[:, j : j + 1] @ Hinv[j : j + 1, :] / Hinv[j, j]
    return Q


def layer(seed=0, rows=12, cols=32, tokens=256):
    X = torch.randn(tokens, cols, generator=gen(seed)) * torch.linspace(0.2, 3.0, cols)
    return torch.randn(rows, cols, generator=gen(seed + 1)), 2 * X.T @ X / tokens


def static_params(W, scheme):
    rows, cols = W.shape
    g = scheme.group_of(cols)
    s, z = qparams(W.reshape(rows, cols // g, g).transpose(0, 1).reshape(-1, g), scheme)
    return s.view(cols // g, rows).T, z.view(cols // g, rows).T


def agree(result, expected):
    close = (result.float() - expected.float()).abs() <= 1e-4 * expected.abs().max()
    assert close.float().mean() >= 0.98, f"only {close.float().mean():.3f} of the weights agree"


@pytest.mark.parametrize("group", [None, 8])
def test_gptq_equals_the_float64_textbook_update(group):
    W, H = layer()
    scheme = QuantScheme(4, group)
    result = obs_compress(W, H, scheme=scheme, blocksize=16, static_groups=True)
    scale, zero = static_params(W, scheme)
    agree(result.weight, textbook_gptq(W, H, scheme, range(W.shape[1]), scale, zero))
    assert torch.equal(result.weight, result.quantized.dequantize())  # the float weight is its codes' value


def test_act_order_with_static_groups_is_the_unpermuted_math_in_another_order():
    W, H = layer(seed=3)
    scheme = QuantScheme(4, 8)
    result = obs_compress(W, H, scheme=scheme, blocksize=16, act_order=True)
    order = torch.argsort(torch.diagonal(H), descending=True).tolist()
    scale, zero = static_params(W, scheme)
    agree(result.weight, textbook_gptq(W, H, scheme, order, scale, zero))
    # codes stay in the original column order, each group with its own columns' scale
    assert torch.equal(result.quantized.scale, scale) and torch.equal(result.weight, result.quantized.dequantize())


def test_inverse_hessian_factor_is_the_upper_factor_of_the_damped_inverse_and_leaves_h_alone():
    from slimformer.methods.obs import inverse_hessian_factor

    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 24, generator=g, dtype=torch.float64)
    X[:, 5] = 0  # a dead input
    H = (2 * X.T @ X / 64).float()
    before = H.clone()
    dead = torch.diagonal(H) == 0
    perm = torch.randperm(24, generator=g)
    U = inverse_hessian_factor(H, 0.01, dead=dead, perm=perm).double()
    assert torch.equal(H, before) and torch.equal(U, U.triu())
    expected = H.double()[perm][:, perm]
    expected.diagonal()[dead[perm]] = 1
    expected.diagonal().add_(0.01 * expected.diagonal().mean())
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(expected), rtol=1e-4, atol=1e-4)


def test_inverse_hessian_factor_in_place_is_the_same_factor_made_in_h():
    from slimformer.methods.obs import inverse_hessian_factor, obs_compress

    g = torch.Generator().manual_seed(1)
    X = torch.randn(80, 40, generator=g)
    X[:, 3] = 0
    H = 2 * X.T @ X / 80
    dead = torch.diagonal(H) == 0
    for perm in (None, torch.randperm(40, generator=g)):
        copied = inverse_hessian_factor(H, 0.01, dead=dead, perm=perm)
        mine = H.clone()
        factor = inverse_hessian_factor(mine, 0.01, dead=dead, perm=perm, in_place=True)
        assert factor.data_ptr() == mine.data_ptr() and torch.equal(factor, copied)
    # a GPTQ given its Hessian to keep gives the weights it gives when it copies it
    W = torch.randn(16, 40, generator=g)
    scheme = QuantScheme(4, 8)
    for act_order in (False, True):
        kept = obs_compress(W, H, scheme=scheme, act_order=act_order)
        given = obs_compress(W, H.clone(), scheme=scheme, act_order=act_order, own_hessian=True)
        assert torch.equal(kept.weight, given.weight) and torch.equal(kept.quantized.codes, given.quantized.codes)


def test_gptq_beats_round_to_nearest_on_the_layer_output():
    W = torch.randn(12, 32, generator=gen(5))
    X = torch.randn(256, 6, generator=gen(6)) @ torch.randn(6, 32, generator=gen(7)) + 0.1 * torch.randn(256, 32, generator=gen(8))
    H = 2 * X.T @ X / 256  # correlated inputs, as in a real layer: the error of one column can be compensated
    scheme = QuantScheme(3, 8)
    gptq = obs_compress(W, H, scheme=scheme).weight
    rtn = quantize_weight(W, scheme).dequantize()
    loss = lambda Q: torch.trace((Q - W) @ H @ (Q - W).T)  # noqa: E731
    assert loss(gptq) < 0.8 * loss(rtn)


# -- methods on tiny models --------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma2", "bert"])
def test_awq_folding_keeps_the_float_function(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    ids = random_ids(2, 10, seed=4)
    expected = logits(model, ids)
    folded = 0
    with torch.no_grad():
        for block in adapter.blocks:
            roles = adapter.linears(block)
            for prev, targets in adapter.family.scale_pairs:
                is_norm = prev not in roles
                module = block.get_submodule(prev) if is_norm else roles[prev]
                width = weight_shape(roles[targets[0]])[1]
                if (module.weight.shape[0] if is_norm else weight_shape(module)[0]) != width:
                    continue
                s = torch.rand(width, generator=gen(folded)) + 0.5
                _fold(module, is_norm, adapter.family.norm_offset, [roles[t] for t in targets], s)
                folded += 1
    assert folded >= len(adapter.blocks)
    assert_close_scaled(logits(model, ids), expected, rel=1e-4)


CONFIGS = [RTNConfig(bits=8), RTNConfig(bits=4, group_size=16, symmetric=False),
           GPTQConfig(bits=4, group_size=16, act_order=True), AWQConfig(bits=4, group_size=16),
           AWQConfig(bits=4, group_size=16, then="gptq"), SparseGPTConfig(0.5, bits=4, group_size=16)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.method}-{getattr(c, 'bits', '')}")
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_quantized_model_reloads_with_identical_logits(family, config, tmp_path):
    model = tiny_model(family)
    adapter = get_adapter(model)
    result = apply(adapter, config, random_ids(4, 16))
    targets = select_linears(get_adapter(tiny_model(family)))
    assert set(quantized_modules(model)) == set(targets) and result.summary["quantized_modules"] == len(targets)
    assert all(info["bits"] == config.bits for info in result.layers.values())
    ids = random_ids(2, 12, seed=9)
    with float_path():
        expected = logits(model, ids)
        dense = logits(tiny_model(family), ids)
    assert torch.isfinite(expected).all() and not torch.equal(expected, dense)
    path = save_model(model, tiny_tokenizer(), tmp_path / "q")
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    reloaded = load_model(str(path)).model
    assert set(quantized_modules(reloaded)) == set(targets)
    with float_path():
        assert torch.equal(logits(reloaded, ids), expected)
    assert torch.equal(logits(reloaded, ids), logits(model, ids))  # the packed kernels too


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "opt", "bert"])
def test_stock_transformers_loads_the_checkpoint_with_the_same_logits(family, tmp_path):
    model = tiny_model(family)
    config = GPTQConfig(bits=4, group_size=16, head=family != "bert", embedding=family != "bert")
    apply(get_adapter(model), config, random_ids(4, 16))
    path = save_model(model, tiny_tokenizer(), tmp_path / "q")
    stock = (AutoModel if family == "bert" else AutoModelForCausalLM).from_pretrained(path).eval()
    ids = random_ids(2, 12, seed=9)
    with float_path():
        assert_close_scaled(logits(stock, ids), logits(model, ids), rel=1e-5)


@pytest.mark.parametrize("family", DECODERS)
def test_head_and_embedding_int8_share_one_table_when_tied(family, tmp_path):
    model = tiny_model(family)
    tied = model.config.tie_word_embeddings
    apply(get_adapter(model), RTNConfig(bits=8, head=True, embedding=True))
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    assert isinstance(head, QuantizedLinear) and isinstance(embed, QuantizedEmbedding)
    assert (head.codes.data_ptr() == embed.codes.data_ptr()) == tied
    ids = random_ids(2, 12, seed=9)
    with float_path():
        assert_close_scaled(logits(model, ids), logits(tiny_model(family), ids), rel=0.05)
        reloaded = load_model(str(save_model(model, tiny_tokenizer(), tmp_path / "q"))).model
        assert torch.equal(logits(reloaded, ids), logits(model, ids))


@pytest.mark.parametrize("config", [RTNConfig(bits=4, group_size=16), GPTQConfig(bits=4, group_size=16),
                                    AWQConfig(bits=4, group_size=16)], ids=lambda c: c.method)
def test_quantizing_a_2_4_model_keeps_the_pattern(config):
    model = tiny_model("llama")
    adapter = get_adapter(model)
    apply(adapter, WandaConfig(pattern="2:4"), random_ids(4, 16))
    apply(adapter, config, random_ids(4, 16))
    for name, module in quantized_modules(model).items():
        W = module.dequantized()
        assert ((W.view(W.shape[0], -1, 4) == 0).sum(-1) >= 2).all(), name


@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, True), (4, None, False), (8, None, True), (8, None, False)])
def test_packed_kernels_match_the_float_path(bits, group, symmetric):
    W = torch.randn(96, 64, generator=gen(7))
    module = QuantizedLinear(quantize_weight(W, QuantScheme(bits, group, symmetric)), torch.randn(96, generator=gen(8)))
    assert module.kernel == ("int8" if bits == 8 else "int4")
    x = torch.randn(3, 64, generator=gen(9))
    with float_path():
        exact = module(x)
    # bfloat16 activations in the kernels: about 3 significant digits
    assert_close_scaled(module(x), exact, rel=2e-2)
    assert_close_scaled(module(x.repeat(24, 1)), exact.repeat(24, 1), rel=1e-5)  # 72 rows: the float path
    assert module.dequantized().shape == W.shape


def test_codes_that_start_off_a_16_byte_boundary_are_copied_for_the_kernels():
    """Codes read from a safetensors file can start anywhere; the int8 kernel's AVX-512 path crashed on
    ones 8 bytes past a 16-byte boundary. On a machine without AVX-512 only the copy is seen."""
    qweight = quantize_weight(torch.randn(96, 64, generator=gen(7)), QuantScheme(8))
    buffer = torch.zeros(96 * 64 + 72, dtype=torch.int8)
    start = (8 - buffer.data_ptr()) % 16 + 16  # 8 bytes past a 16-byte boundary
    shifted = buffer[start : start + 96 * 64].view(96, 64)
    shifted.copy_(qweight.codes)
    assert shifted.data_ptr() % 16 == 8
    module = QuantizedLinear(type(qweight)(shifted, qweight.scale, qweight.zero, qweight.scheme))
    assert module.kernel == "int8" and module.codes.data_ptr() % 64 == 0
    x = torch.randn(3, 64, generator=gen(9))
    with float_path():
        exact = module(x)
    assert_close_scaled(module(x), exact, rel=2e-2)


def test_the_int4_kernel_view_follows_the_codes_device():
    """Off the CPU the kernel's packed view is dropped; a module that arrives on the CPU without it
    (built or trained on a GPU) packs it again, and decodes as one built on the CPU."""
    W = torch.randn(96, 64, generator=gen(7))
    built = QuantizedLinear(quantize_weight(W, QuantScheme(4, 32)))
    moved = QuantizedLinear(quantize_weight(W, QuantScheme(4, 32))).to("meta")
    assert moved.kernel is None and "int4_packed" not in dict(moved.named_buffers())
    arrived = QuantizedLinear(quantize_weight(W, QuantScheme(4, 32)))
    arrived.kernel = None  # what a module made on a GPU carries
    for name in ("int4_packed", "int4_scales_zeros"):
        del arrived._buffers[name]
    arrived.to("cpu")
    assert arrived.kernel == "int4"
    x = torch.randn(3, 64, generator=gen(9))
    assert torch.equal(arrived(x), built(x))


def test_dequantized_modules_stay_on_the_device_of_their_weights(monkeypatch):
    """Training a quantized model on a GPU dequantizes it there: the float Linears are made where
    the dequantized weights are (the meta device stands in for the GPU here)."""
    from slimformer.models.quantized import dequantize_model

    model = tiny_model("llama")
    apply(get_adapter(model), RTNConfig(bits=4, group_size=16))
    monkeypatch.setattr(QuantizedLinear, "dequantized", lambda self, dtype=torch.float32:
                        torch.empty(self.out_features, self.in_features, dtype=dtype, device="meta"))
    dequantize_model(model)
    linears = select_linears(get_adapter(model))
    assert not quantized_modules(model) and {m.weight.device.type for m in linears.values()} == {"meta"}


# -- bad input -----------------------------------------------------------------------------------------
def test_invalid_configs_fail_in_one_line():
    with pytest.raises(SlimformerError, match="bits must be one of 2, 3, 4, 8, not 5"):
        RTNConfig(bits=5)
    with pytest.raises(SlimformerError, match="awq then must be"):
        AWQConfig(then="sparsegpt")
    model = tiny_model("llama")
    with pytest.raises(SlimformerError, match="group size 24 does not divide the input width 32; sizes that fit: 16"):
        apply(get_adapter(model), RTNConfig(bits=4, group_size=24))
    assert not quantized_modules(model)
    with pytest.raises(SlimformerError, match="needs calibration samples"):
        apply(get_adapter(model), GPTQConfig())


@pytest.mark.parametrize("argv,message", [
    (["--method", "gptq", "--bits", "5"], "bits must be one of 2, 3, 4, 8, not 5"),
    (["--method", "rtn", "--group-size", "24"], "does not divide the input width 32"),
])
def test_cli_bad_quantize_input_exits_2_and_writes_nothing(saved_tiny, tmp_path, capsys, argv, message):
    path, text = saved_tiny
    out = tmp_path / "q"
    assert main(["quantize", str(path), *argv, "--calib", str(text), "--nsamples", "2", "--seqlen", "16",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists() and not list(tmp_path.glob(".q*"))


def test_cli_quantize_writes_a_checkpoint_that_loads(saved_tiny, tmp_path, capsys):
    path, text = saved_tiny
    out = tmp_path / "q"
    assert main(["quantize", str(path), "--method", "gptq", "--bits", "4", "--group-size", "16", "--act-order",
                 "--calib", str(text), "--nsamples", "2", "--seqlen", "16", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "gptq: 21 modules to int4 g16 sym" in printed
    assert set(quantized_modules(load_model(str(out)).model)) == set(select_linears(get_adapter(tiny_model("llama"))))
    report = json.loads((out / "report.json").read_text())
    step = report["steps"][0]
    assert step["bits_grid"]["values"][0][0] == "int4 g16" and step["mean_bits"] == 4
    assert "Bits per layer" in (out / "report.html").read_text()


def test_checkpoints_targeting_class_names_load_as_llm_compressor_writes_them(tmp_path):
    """llm-compressor lists ``targets: [Linear]`` with ``ignore: [lm_head]`` rather than module names."""
    model = tiny_model("llama")
    apply(get_adapter(model), RTNConfig(bits=4, group_size=16))
    path = save_model(model, tiny_tokenizer(), tmp_path / "q")
    config = json.loads((path / "config.json").read_text())
    group = next(iter(config["quantization_config"]["config_groups"].values()))
    group["targets"], config["quantization_config"]["ignore"] = ["Linear"], ["lm_head"]
    (path / "config.json").write_text(json.dumps(config))
    reloaded = load_model(str(path)).model
    assert set(quantized_modules(reloaded)) == set(quantized_modules(model))
    ids = random_ids(2, 12, seed=9)
    assert torch.equal(logits(reloaded, ids), logits(model, ids))


@pytest.mark.parametrize("config", [RTNConfig(bits=4, group_size=16), GPTQConfig(bits=4, group_size=16),
                                    AWQConfig(bits=4, group_size=16), SparseGPTConfig(0.5, bits=4, group_size=16)],
                         ids=["rtn", "gptq", "awq", "sparsegpt-int4"])
def test_a_quantized_block_lets_go_of_its_float_projections(config, monkeypatch):
    """Once a block is done nothing keeps its replaced float modules (a streamed run would hold a float block per block)."""
    import gc
    import weakref

    from slimformer.methods.quantization import BlockInstaller

    adapter = get_adapter(tiny_model("llama"))
    first = [weakref.ref(m) for m in adapter.linears(adapter.blocks[0]).values()]
    alive_later = []
    finish = BlockInstaller.finish

    def check(self, index, modules):
        if index == 1:
            gc.collect()
            alive_later.append(sum(ref() is not None for ref in first))
        return finish(self, index, modules)

    monkeypatch.setattr(BlockInstaller, "finish", check)
    apply(adapter, config, None if isinstance(config, RTNConfig) else random_ids(4, 16))
    assert alive_later == [0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("config", [GPTQConfig(bits=4, group_size=16), GPTQConfig(bits=4, group_size=16, act_order=False,
                                                                                   mse=True),
                                    SparseGPTConfig(0.5, bits=4, group_size=16)], ids=["gptq", "gptq-dynamic-mse", "sparsegpt-int4"])
def test_quantizing_on_a_gpu_gives_the_cpu_model_back_on_the_cpu(config):
    import dataclasses

    samples = random_ids(4, 32)
    ref, dev = tiny_model("llama"), tiny_model("llama")
    apply(get_adapter(ref), config, samples)
    apply(get_adapter(dev), dataclasses.replace(config, device="cuda"), samples)
    assert {t.device.type for t in [*dev.parameters(), *dev.buffers()]} == {"cpu"}
    with torch.no_grad():
        assert_close_scaled(dev(samples).logits, ref(samples).logits, rel=1e-3)
