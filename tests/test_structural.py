"""Structural search end to end on tiny models: decoder one-shot, encoder two-stage, CLI, resume and extraction."""

import copy
import json
import random
from dataclasses import replace

import pytest
import torch

from conftest import TINY_REL, assert_close_scaled, random_ids, tiny_model, tiny_tokenizer
from slimformer import SlimformerError, get_adapter, load_model, save_model
from slimformer.cli import main
from slimformer.search.space import Importance, SearchSpace, count_params, masked
from slimformer.search.decoder import decoder_search
from slimformer.search.encoder import encoder_search, select_schedule, task_splits, train_stage1
from slimformer.search.structural import SearchConfig, importance_prune, initial_points


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_importance_pruning_hits_the_target_size(family):
    adapter = get_adapter(tiny_model(family))
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 48)] * 3
    space = SearchSpace("large", adapter, Importance([torch.rand(h, generator=g) for h, _ in shapes],
                                                     [torch.rand(u, generator=g) for _, u in shapes]))
    total = count_params(adapter)
    last = 0
    for target in (0.6, 0.75, 0.9):
        subnet = importance_prune(space, target)
        size = count_params(adapter, subnet) / total
        assert size <= target + 0.02 and size >= target - 0.06, (target, size)
        assert size >= last
        last = size


def test_decoder_one_shot_search_scores_subnetworks_by_perplexity():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    samples = random_ids(3, 16)
    config = SearchConfig(space="medium", strategy="random", trials=6, importance_batches=2)
    found = decoder_search(adapter, samples, config, progress=False)
    result = found["result"]
    assert len(result.trials) == 6 and result.pareto
    assert result.trials[0]["params"] == found["space"].largest()
    assert result.trials[0]["values"][1] == pytest.approx(1.0)  # the full model keeps all parameters
    full_loss = torch.nn.functional.cross_entropy(
        model(input_ids=samples).logits[:, :-1].flatten(0, 1), samples[:, 1:].flatten()).exp().item()
    assert result.trials[0]["values"][0] == pytest.approx(full_loss, rel=TINY_REL)
    smallest = result.trials[1]
    assert smallest["values"][1] < 0.9


def test_encoder_two_stage_search_runs_and_compares_with_importance_pruning():
    encoder, tokenizer = tiny_model("bert"), tiny_tokenizer()
    config = SearchConfig(space="small", strategy="random", trials=4, epochs=1, train_limit=64, search_valid=40,
                          batch_size=16, importance_batches=2, max_length=48)
    stage1 = train_stage1(encoder, tokenizer, "glue:rte", config, progress=False)
    assert set(stage1.timing) == {"reference_finetune_s", "supernet_finetune_s"}
    changed = [n for n, p in stage1.supernet.state_dict().items() if not torch.equal(p, stage1.reference.state_dict()[n])]
    assert changed  # the super-network started from the reference and trained on
    found = encoder_search(stage1, tokenizer, "rte", config, progress=False)
    assert len(found["result"].trials) == 4
    assert len(found["dev_front"]) == len(found["result"].pareto)
    assert [b["target"] for b in found["baseline"]] == list(config.baseline_sizes)
    # importance pruning at the searched front's own sizes too, point for point
    front_sizes = sorted(round(p["params"], 3) for p in found["dev_front"] if p["params"] < 0.999)
    assert [b["target"] for b in found["baseline_at_front"]] == sorted(set(front_sizes))
    for row in found["dev_front"] + found["baseline"]:
        assert 0 <= row["dev"]["accuracy"] <= 1 and row["dev"]["examples"] == 277


def test_schedule_selection_picks_the_reference_best_on_held_out_examples():
    from slimformer.evaluation.glue import classifier_from, evaluate_classifier, finetune_classifier

    encoder, tokenizer = tiny_model("bert"), tiny_tokenizer()
    config = SearchConfig(space="small", trials=2, epochs=1, lr=5e-5, train_limit=48, search_valid=40,
                          batch_size=16, max_length=32)
    grid = [(1, 1e-5), (2, 3e-3)]
    chosen, rows, reference = select_schedule(encoder, tokenizer, "glue:rte", config, grid, progress=False)
    assert [(r["epochs"], r["lr"]) for r in rows] == grid
    best = max(range(len(rows)), key=lambda i: (rows[i]["search_valid_score"], -i))
    assert (chosen.epochs, chosen.lr) == grid[best] and chosen.space == config.space
    # each row is a real fine-tune measured on the held-out part: redoing the second one gives its figure
    info, train, held_out, _ = task_splits("glue:rte", config)
    model = classifier_from(copy.deepcopy(encoder), info.num_labels, seed=config.seed)
    finetune_classifier(model, tokenizer, train, epochs=2, lr=3e-3, batch_size=16, max_length=32, progress=False)
    again = evaluate_classifier(model, tokenizer, held_out, max_length=32)["accuracy"]
    assert rows[1]["search_valid_score"] == pytest.approx(again)
    # the winner is handed to stage 1 as its reference, not fine-tuned again
    won = evaluate_classifier(reference, tokenizer, held_out, max_length=32)["accuracy"]
    assert won == pytest.approx(rows[best]["search_valid_score"])
    stage1 = train_stage1(encoder, tokenizer, "glue:rte", replace(chosen, importance_batches=1), reference=reference,
                          progress=False)
    assert stage1.reference is reference and "reference_finetune_s" not in stage1.timing
    with pytest.raises(SlimformerError, match="empty"):
        select_schedule(encoder, tokenizer, "glue:rte", config, [], progress=False)


def test_importance_pruned_networks_seed_the_search_and_the_baseline_can_follow_the_front():
    encoder, tokenizer = tiny_model("bert"), tiny_tokenizer()
    config = SearchConfig(space="medium", strategy="random", trials=8, epochs=1, train_limit=32, search_valid=40,
                          batch_size=16, importance_batches=1, max_length=32, baseline_sizes=(0.8, 0.9))
    stage1 = train_stage1(encoder, tokenizer, "glue:rte", config, progress=False)
    found = encoder_search(stage1, tokenizer, "rte", config, progress=False)
    space = found["space"]
    seeds = [space.params_of(importance_prune(space, size)) for size in config.baseline_sizes]
    asked = [t["params"] for t in found["result"].trials]
    assert all(seed is not None and seed in asked[:7] for seed in seeds)
    # the baseline's sub-networks are the seeds: same sizes, measured with the reference's weights
    assert sorted(b["params"] for b in found["baseline"]) == sorted(
        count_params(space.adapter, space.subnet(seed)) / count_params(space.adapter) for seed in seeds)
    unseeded = SearchConfig(**{**config.__dict__, "seed_baseline": False, "baseline_sizes": ()})
    found = encoder_search(stage1, tokenizer, "rte", unseeded, progress=False)
    assert not any(seed in initial_points(space) for seed in seeds)
    assert [b["target"] for b in found["baseline"]] == sorted({round(p["params"], 3) for p in found["dev_front"]
                                                               if p["params"] < 0.999})


def test_cli_search_resumes_and_extracts(saved_tiny, tmp_path, capsys, monkeypatch):
    from slimformer.search import decoder

    path, text = saved_tiny
    out = tmp_path / "run"
    args = ["search", str(path), "--space", "medium", "--strategy", "random", "--task", f"text:{text}",
            "--nsamples", "3", "--seqlen", "16", "--out", str(out)]
    assert main([*args, "--trials", "3"]) == 0
    first = json.loads((out / "search.json").read_text())

    def recompute(*args, **kwargs):
        raise AssertionError("a resumed search ranks heads and units again")

    monkeypatch.setattr(decoder, "mask_gradient_importance", recompute)
    assert main([*args, "--trials", "5"]) == 0
    second = json.loads((out / "search.json").read_text())
    assert [t["params"] for t in second["trials"][:3]] == [t["params"] for t in first["trials"]]
    assert len(second["trials"]) == 5 and (out / "front.png").stat().st_size > 0
    trial = second["trials"][second["pareto"][-1]]
    assert main(["extract", str(out), "--trial", str(trial["number"]), "--out", str(tmp_path / "small")]) == 0
    small = load_model(str(tmp_path / "small")).model
    dense = load_model(str(path))
    from slimformer.search.runs import _load_importance

    space = SearchSpace("medium", dense.adapter, _load_importance(out / "importance.pt"))
    ids = random_ids(1, 12)
    with torch.no_grad(), masked(dense.adapter, space.subnet(trial["params"])):
        expected = dense.model(input_ids=ids).logits
    assert_close_scaled(small(input_ids=ids).logits, expected)
    # A different search in the same folder is refused.
    assert main([*args, "--trials", "5", "--space", "small"]) == 2
    assert "holds a different search" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--space", "huge"], "unknown search space 'huge'"),
    (["--strategy", "annealing"], "unknown strategy 'annealing'"),
    (["--objectives", "error,beauty"], "unknown objective 'beauty'"),
    (["--backend", "slurm"], "unknown backend 'slurm'"),
    (["--epochs", "0"], "epochs must be a whole number of at least 1"),
])
def test_cli_search_bad_input(saved_tiny, tmp_path, capsys, flags, message):
    path, text = saved_tiny
    assert main(["search", str(path), "--task", f"text:{text}", "--out", str(tmp_path / "r"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_cli_encoder_search_end_to_end(tmp_path, capsys):
    path = save_model(tiny_model("bert"), tiny_tokenizer(), tmp_path / "bert")
    out = tmp_path / "r"
    assert main(["search", str(path), "--task", "glue:rte", "--space", "small", "--strategy", "random", "--trials", "3",
                 "--epochs", "1", "--train-limit", "32", "--max-length", "48", "--out", str(out)]) == 0
    summary = json.loads((out / "search.json").read_text())
    assert len(summary["trials"]) == 3 and summary["reference_dev"]["examples"] == 277
    assert summary["dev_front"] and summary["baseline"]["runs"] and (out / "stage1" / "supernet" / "config.json").exists()
    assert json.loads((out / "run.json").read_text())["config"]["epochs"] == 1
    assert main(["search", str(path), "--task", "glue:rte", "--max-length", "128", "--out", str(tmp_path / "r2")]) == 2
    assert "longer than the model's 64 positions" in capsys.readouterr().err and not (tmp_path / "r2").exists()


def test_epochs_are_whole():
    assert SearchConfig(epochs=2.0).epochs == 2
    with pytest.raises(SlimformerError, match="whole number"):
        SearchConfig(epochs=1.5)


def test_encoder_needs_a_glue_task_with_data(tmp_path, capsys):
    path = save_model(tiny_model("bert"), tiny_tokenizer(), tmp_path / "bert")
    assert main(["search", str(path), "--task", "wikitext2", "--out", str(tmp_path / "r")]) == 2
    assert "GLUE task" in capsys.readouterr().err
    assert main(["search", str(path), "--task", "glue:colas", "--out", str(tmp_path / "r")]) == 2
    assert "unknown GLUE task 'glue:colas'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_encoder_search_on_a_regression_task_maximises_pearson(tmp_path, monkeypatch):
    """STS-B: float scores, a one-output head trained with MSE, and 1 − Pearson as the error objective."""
    from slimformer.search.runs import run_search_job

    rng = random.Random(0)
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    folder = tmp_path / "glue" / "STS-B"
    folder.mkdir(parents=True)
    for name, n in (("train.tsv", 40), ("dev.tsv", 12)):
        rows = [f"{i}\tg\tf\ty\t{i}\tn\tn\tw{rng.randrange(1, 99)} w{rng.randrange(1, 99)}\tw{rng.randrange(1, 99)}"
                f"\t{rng.uniform(0, 5):.3f}\n" for i in range(n)]
        (folder / name).write_text(header + "".join(rows))
    monkeypatch.setenv("SLIMFORMER_DATA", str(tmp_path))
    path = save_model(tiny_model("bert"), tiny_tokenizer(), tmp_path / "bert")
    config = SearchConfig(space="small", strategy="random", trials=3, epochs=1, search_valid=8, max_length=16,
                          batch_size=8, baseline_sizes=(0.8,))
    summary = run_search_job(str(path), "glue:stsb", config, tmp_path / "r", progress=False)
    for point in summary["dev_front"]:
        assert {"pearson", "spearman", "score"} <= set(point["dev"]) and point["dev"]["score"] == point["dev"]["pearson"]
    assert summary["reference_dev"]["examples"] == 12 and "accuracy" not in summary["reference_dev"]


def test_ray_backend_evaluates_subnetworks_like_the_local_one():
    pytest.importorskip("ray", reason="the ray extra is not installed")
    adapter = get_adapter(tiny_model("llama"))
    samples = random_ids(2, 12)
    runs = {}
    for backend in ("local", "ray"):
        config = SearchConfig(space="small", strategy="random", trials=4, importance_batches=1, backend=backend)
        runs[backend] = decoder_search(adapter, samples, config, progress=False)["result"]
    local = {json.dumps(t["params"], sort_keys=True): t["values"] for t in runs["local"].trials}
    for t in runs["ray"].trials:  # whatever Ray's batches sampled, each point is measured as in-process
        key = json.dumps(t["params"], sort_keys=True)
        if key in local:
            assert t["values"] == pytest.approx(local[key], rel=TINY_REL)  # Ray workers run other thread counts
    assert len(runs["ray"].trials) == 4 and runs["ray"].trials[0]["values"] == pytest.approx(runs["local"].trials[0]["values"], rel=TINY_REL)


@pytest.mark.parametrize("distill", ["none", "inplace", "reference"])
def test_sandwich_loss_sums_the_largest_and_the_smallest_with_the_chosen_targets(distill):
    import copy

    import torch.nn.functional as F

    from slimformer.data.glue import GlueExample
    from slimformer.evaluation.glue import batches, classifier_from
    from slimformer.search.supernet import sandwich_loss

    model = classifier_from(tiny_model("bert"), 2)
    teacher = classifier_from(tiny_model("bert"), 2, seed=1)  # differs from the student, so the targets differ
    tokenizer = tiny_tokenizer()
    examples = [GlueExample("a b c", "d e", 0), GlueExample("c d", "a a b", 1), GlueExample("e", "b c", 1)]
    batch = next(iter(batches(tokenizer, examples, 3, 16)))
    space = SearchSpace("medium", get_adapter(model), Importance([torch.rand(4)] * 3, [torch.rand(48)] * 3))
    loss = sandwich_loss(space, random_subnets=0, distill=distill, teacher=copy.deepcopy(teacher))(model, batch)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        full = model(**inputs).logits
        with masked(space.adapter, space.subnet(space.smallest())):
            small = model(**inputs).logits
        taught = teacher(**inputs).logits
    labels = batch["labels"]
    soft = lambda target, logits: -(F.softmax(target, -1) * F.log_softmax(logits, -1)).sum(-1).mean()  # noqa: E731
    expected = {
        "none": F.cross_entropy(full, labels) + F.cross_entropy(small, labels),
        "inplace": F.cross_entropy(full, labels) + soft(full, small),
        "reference": (F.cross_entropy(full, labels) + soft(taught, full)) / 2 + soft(taught, small),
    }[distill]
    assert loss.item() == pytest.approx(expected.item(), rel=TINY_REL)
    assert loss.requires_grad


def test_sandwich_loss_bad_input():
    from slimformer.search.supernet import sandwich_loss

    space = SearchSpace("medium", get_adapter(tiny_model("bert")), Importance([torch.rand(4)] * 3, [torch.rand(48)] * 3))
    with pytest.raises(SlimformerError, match="unknown distillation 'teacher'"):
        sandwich_loss(space, distill="teacher")
    with pytest.raises(SlimformerError, match="needs the teacher"):
        sandwich_loss(space, distill="reference")
    with pytest.raises(SlimformerError, match="unknown sampling 'even'"):
        sandwich_loss(space, sampling="even")
    with pytest.raises(SlimformerError, match="unknown distillation"):
        SearchConfig(distill="yes")
    with pytest.raises(SlimformerError, match="unknown sampling"):
        SearchConfig(sampling="even")
