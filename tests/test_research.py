"""The research studies: their maths against exact references, and `run_all.py --quick` end to end."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import hessian_quality as hq  # noqa: E402


def tiny_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def tiny_data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


# ----------------------------------------------------------------------------- RQ1 maths
@pytest.mark.parametrize("index", [0, 2, 4])
def test_curvlinops_block_is_the_exact_hessian_block(index: int) -> None:
    """The Hessian block RQ1 builds from curvlinops (on the network's suffix) equals autograd's."""
    cl = pytest.importorskip("curvlinops")
    model, (x, y) = tiny_mlp(), tiny_data()
    layer = hq.linear_at(model, index)
    block = hq.Block("b", index)
    idx = hq.block_indices(model, block)
    with torch.no_grad():
        inputs = model[:index](x)
    op = cl.HessianLinearOperator(model[index:], nn.CrossEntropyLoss(), [layer.weight], hq.batches(inputs, y, 16),
                                  check_deterministic=False)
    got = hq.operator_block(op, layer.weight.numel(), idx, columns_per_call=7)

    def loss(w: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, {f"{index}.weight": w.view_as(layer.weight)}, (x,))
        return F.cross_entropy(out, y)

    expected = torch.autograd.functional.hessian(loss, layer.weight.detach().reshape(-1))
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


def test_block_loss_is_the_model_loss() -> None:
    model, (x, y) = tiny_mlp(), tiny_data()
    block = hq.Block("fc2", 2)
    loss = hq.BlockLoss(model, block, x, y, hq.block_indices(model, block))
    with torch.no_grad():
        assert loss.base == pytest.approx(float(F.cross_entropy(model(x), y)), rel=1e-12)
        w = loss.block_weights()
        w[3] = 0.0
        hq.linear_at(model, 2).weight.view(-1)[3] = 0.0
        assert float(loss(w.unsqueeze(0))[0]) == pytest.approx(float(F.cross_entropy(model(x), y)), rel=1e-12)


def random_spd(d: int, seed: int) -> torch.Tensor:
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64)


def constrained_minimum(hessian: torch.Tensor, w: torch.Tensor, pruned: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Brute force: minimise ½ δᵀHδ subject to δ_Q = −w_Q by solving the KKT system."""
    d, q = len(w), int(pruned.sum())
    e = torch.eye(d, dtype=torch.float64)[pruned]  # (q, d)
    kkt = torch.zeros(d + q, d + q, dtype=torch.float64)
    kkt[:d, :d], kkt[:d, d:], kkt[d:, :d] = hessian, e.T, e
    rhs = torch.cat([torch.zeros(d, dtype=torch.float64), -w[pruned]])
    delta = torch.linalg.solve(kkt, rhs)[:d]
    return w + delta, float(0.5 * delta @ hessian @ delta)


def test_obs_removals_match_the_constrained_minimum() -> None:
    hessian = random_spd(9, 0)
    inverse = torch.linalg.inv(hessian)
    w = torch.randn(9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    pruned = torch.zeros(9, dtype=torch.bool)
    pruned[[1, 4, 5]] = True
    got, predicted = hq.group_removal(w, inverse, pruned)
    expected, loss = constrained_minimum(hessian, w, pruned)
    torch.testing.assert_close(got, expected)
    assert predicted == pytest.approx(loss, rel=1e-10)
    singles = hq.single_weight_removal(w, inverse, torch.tensor([4, 7]))
    for row, q in zip(singles, (4, 7), strict=True):
        one = torch.zeros(9, dtype=torch.bool)
        one[q] = True
        expected, loss = constrained_minimum(hessian, w, one)
        torch.testing.assert_close(row, expected)
        assert float(hq.obs_statistic(w, inverse)[q]) == pytest.approx(loss, rel=1e-10)


# ----------------------------------------------------------------------------- K-FAC pruning
def tiny_cnn() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 5 * 5, 3))


def cnn_batches(n: int = 24):  # -> factory of (x, y) mini-batches
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(n, 1, 5, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    return lambda: [(x[i : i + 8], y[i : i + 8]) for i in range(0, n, 8)]


def test_kronecker_inverse_diag_and_products_match_the_explicit_inverse() -> None:
    from wf_pipeline.pruning.research.kfac import KroneckerEigen

    g, a, damp = random_spd(3, 5), random_spd(4, 6), 0.3
    eigen = KroneckerEigen.from_factors(g, a)
    inverse = torch.linalg.inv(torch.kron(g, a) + damp * torch.eye(12, dtype=torch.float64))
    torch.testing.assert_close(eigen.inverse_diag(damp).reshape(-1), inverse.diagonal())
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(eigen.inverse_matmul(x, damp).reshape(-1), inverse @ x.reshape(-1))


def test_kfac_factors_reproduce_curvlinops_operator() -> None:
    """Our eigendecomposed factors, in our flat (row-major) order, are the library's K-FAC matrix."""
    cl = pytest.importorskip("curvlinops")
    from wf_pipeline.pruning.research.kfac import kfac_factors

    model = tiny_cnn().eval()
    params = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    data = cnn_batches()()
    factors = kfac_factors(model, params, data, "empirical")
    op = cl.KFACLinearOperator(model, nn.CrossEntropyLoss(), list(params.values()), data, fisher_type="empirical",
                               check_deterministic=False)
    dense = op @ torch.eye(sum(p.numel() for p in params.values()))
    offset = 0
    for name, p in params.items():
        n = p.numel()
        torch.testing.assert_close(factors[name].dense().float(), dense[offset : offset + n, offset : offset + n],
                                   rtol=1e-4, atol=1e-6)
        offset += n


def test_kfac_update_is_the_obs_update_of_the_kfac_matrix() -> None:
    from wf_pipeline.pruning.research.kfac import KroneckerEigen, kfac_independent_update

    weight = nn.Parameter(torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(8)))
    eigen, damp = KroneckerEigen.from_factors(random_spd(3, 9), random_spd(4, 10)), 0.2
    inverse = torch.linalg.inv(eigen.dense() + damp * torch.eye(12, dtype=torch.float64))
    w = weight.detach().reshape(-1)
    for q in (0, 5, 11):
        pruned = torch.zeros(12, dtype=torch.bool)
        pruned[q] = True
        new, predicted = kfac_independent_update({"w": weight}, {"w": eigen}, pruned, damp)
        expected = w - w[q] / inverse[q, q] * inverse[:, q]
        expected[q] = 0.0
        torch.testing.assert_close(new, expected)
        assert predicted == pytest.approx(float(w[q] ** 2 / (2 * inverse[q, q])), rel=1e-10)


def test_kfac_pruner_through_prune_step() -> None:
    pytest.importorskip("curvlinops")
    from wf_pipeline.pruning import MaskSet
    from wf_pipeline.pruning.settings import PruneSettings
    from wf_pipeline.pruning.step import prune_step

    model = tiny_cnn()
    params = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    masks = MaskSet.dense(params)
    before = {n: p.detach().clone() for n, p in params.items()}
    report = prune_step(model, params, masks, 0.6, PruneSettings("kfac", num_grads=24, damp=1e-3), cnn_batches())
    assert report.achieved_sparsity == pytest.approx(0.6, abs=1e-2) and report.method == "kfac"
    for name, p in params.items():
        assert torch.all(p[~masks.masks[name]] == 0)
    kept_changed = any(not torch.equal(p[masks.masks[n]], before[n][masks.masks[n]]) for n, p in params.items())
    assert kept_changed, "the OBS update moves the surviving weights"
    assert report.predicted_loss_increase is not None and report.predicted_loss_increase > 0


def test_kfac_without_curvlinops_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from wf_pipeline.errors import WFError
    from wf_pipeline.pruning.pruners.registry import build_pruner
    from wf_pipeline.pruning.settings import PruneSettings

    monkeypatch.setitem(sys.modules, "curvlinops", None)  # import curvlinops -> ImportError
    with pytest.raises(WFError) as info:
        build_pruner(PruneSettings("kfac"))
    assert "curvlinops" in str(info.value) and "research" in (info.value.hint or "")


# ----------------------------------------------------------------------------- the one-shot studies' shortcut
def test_oneshot_core_matches_prune_step() -> None:
    """The studies compute statistics once per Fisher draw; the pruned weights equal prune_step's."""
    from benchmarks.research.oneshot_core import Selection, Statistics, collect_statistics, prune_copy
    from wf_pipeline.pruning import MaskSet
    from wf_pipeline.pruning.settings import PruneSettings
    from wf_pipeline.pruning.step import prune_step

    model, batches = tiny_cnn(), cnn_batches()
    selection = Selection()
    stats = collect_statistics(model, selection, batches, num_grads=24, block_size=16, damp=1e-3)
    for method in ("woodfisher", "woodtaylor", "diag_fisher", "magnitude_uniform"):
        ours, _ = prune_copy(model, method, stats, 0.5, selection, damp=1e-3)
        reference = tiny_cnn()
        params = selection.params(reference)
        prune_step(reference, params, MaskSet.dense(params), 0.5,
                   PruneSettings(method, num_grads=24, block_size=16, damp=1e-3), batches)
        for (name, p), q in zip(params.items(), selection.params(ours).values(), strict=True):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=f"{method} {name}")
    assert isinstance(stats, Statistics)


def test_kfac_block_inverse_is_the_diagonal_blocks_of_the_kfac_inverse() -> None:
    """K-FAC's inverse restricted to WoodFisher's blocks (blocks that straddle rows, and padding) is exact."""
    from benchmarks.research.oneshot_core import kfac_block_inverse
    from wf_pipeline.pruning.research.kfac import KroneckerEigen

    damp, block = 0.2, 5
    params = {"a": nn.Parameter(torch.randn(3, 4, dtype=torch.float64)),
              "b": nn.Parameter(torch.randn(2, 6, dtype=torch.float64))}
    factors = {"a": KroneckerEigen.from_factors(random_spd(3, 11), random_spd(4, 12)),
               "b": KroneckerEigen.from_factors(random_spd(2, 13), random_spd(6, 14))}
    inverse = kfac_block_inverse(params, factors, damp, block)
    for layer, name in enumerate(params):
        n = params[name].numel()
        dense = torch.linalg.inv(factors[name].dense() + damp * torch.eye(n, dtype=torch.float64))
        k0 = inverse.layout.block_offsets[layer]
        for k in range(inverse.layout.blocks_per_layer[layer]):
            lo, hi = k * block, min((k + 1) * block, n)
            torch.testing.assert_close(inverse.blocks[k0 + k, : hi - lo, : hi - lo], dense[lo:hi, lo:hi])
            if hi - lo < block:
                torch.testing.assert_close(inverse.blocks[k0 + k, hi - lo :, hi - lo :],
                                           torch.eye(block - hi + lo, dtype=torch.float64) / damp)


def test_same_update_rule_for_woodfisher_and_kfac() -> None:
    """The rule-matched K-FAC methods prune what K-FAC OBS prunes; with one block per layer, the independent
    rule is the whole-layer one, and the joint rule is the constrained minimum of K-FAC's quadratic model."""
    pytest.importorskip("curvlinops")
    from benchmarks.research.oneshot_core import Selection, collect_statistics, prune_copy

    model, batches = tiny_cnn(), cnn_batches()
    selection = Selection()
    stats = collect_statistics(model, selection, batches, num_grads=24, block_size=128, damp=1e-3, kfac=True)
    whole, _ = prune_copy(model, "kfac", stats, 0.5, selection, damp=1e-3)
    independent, _ = prune_copy(model, "kfac_independent", stats, 0.5, selection, damp=1e-3)
    joint, info = prune_copy(model, "kfac_joint", stats, 0.5, selection, damp=1e-3)
    assert stats.kfac is not None
    for name, p in selection.params(joint).items():
        mask = p == 0
        assert torch.equal(mask, selection.params(whole)[name] == 0), name  # same scores, same choice
        if p.numel() <= 128:  # the layer is one block: block-local rules are the whole-layer ones
            torch.testing.assert_close(selection.params(independent)[name], selection.params(whole)[name])
            fisher = stats.kfac[name].dense() + 1e-3 * torch.eye(p.numel(), dtype=torch.float64)
            w0 = selection.params(model)[name].detach().double().reshape(-1)
            expected, _ = constrained_minimum(fisher, w0, mask.reshape(-1))
            torch.testing.assert_close(p.detach().double().reshape(-1), expected, rtol=1e-4, atol=1e-6)
    assert info["predicted_loss_increase"] > 0
    wf_joint, _ = prune_copy(model, "woodfisher", stats, 0.5, selection, damp=1e-3)
    wf_independent, _ = prune_copy(model, "woodfisher_independent", stats, 0.5, selection, damp=1e-3)
    for p, q in zip(selection.params(wf_joint).values(), selection.params(wf_independent).values(), strict=True):
        assert torch.equal(p == 0, q == 0) and not torch.equal(p, q)  # same choice, another update


def test_hand_tuned_counts_keep_first_and_last_dense_and_meet_the_total() -> None:
    from benchmarks.research.rq4_layerwise import hand_tuned_counts

    sizes = [144, 2304, 2304, 9216, 640]
    counts = hand_tuned_counts(["a", "b", "c", "d", "e"], sizes, 0.8)
    assert counts[0] == counts[-1] == 0 and sum(counts) == round(0.8 * sum(sizes))
    assert all(c <= n for c, n in zip(counts, sizes, strict=True))


# ----------------------------------------------------------------------------- long studies: resume, reduced runs
def test_unit_log_resumes_only_finished_units_of_the_same_configuration(tmp_path: Path) -> None:
    from benchmarks.research.common import UnitLog

    units = UnitLog(tmp_path, "study", {"n": 1000}, resume=False)
    units.add("a|0.9|0", {"accuracy": 0.5})
    units.add("b|0.9|0", {"accuracy": 0.6})
    UnitLog(tmp_path, "study", {"n": 64}, resume=True).add("a|0.9|1", {"accuracy": 0.1})  # another configuration
    with open(units.path, "a") as f:
        f.write('{"key": "c|0.9|0", "config": {"n": 1000}, "val')  # a line torn by a kill
    resumed = UnitLog(tmp_path, "study", {"n": 1000}, resume=True)
    assert resumed.done == {"a|0.9|0": {"accuracy": 0.5}, "b|0.9|0": {"accuracy": 0.6}}
    fresh = UnitLog(tmp_path, "study", {"n": 1000}, resume=False)  # without --resume a new run starts clean
    assert fresh.done == {} and not fresh.path.exists()
    fresh.add("a|0.9|0", {"accuracy": 0.5})
    fresh.finish()
    assert not fresh.path.exists()


def test_cell_store_writes_one_file_per_cell_and_reuses_only_the_same_configuration(tmp_path: Path) -> None:
    from benchmarks.research.common import CellStore

    store = CellStore(tmp_path, {"budget": 240})
    store.add("woodfisher|0.9|0|pruning.woodfisher.damp=1e-3", {"test_accuracy": 0.9})
    CellStore(tmp_path, {"budget": 1800}).add("magnitude|0.9|0|default", {"test_accuracy": 0.8})  # another config
    (tmp_path / "torn.json").write_text('{"key": "kfac|0.9|0|default", "conf')  # a file cut by a kill
    assert len(list(tmp_path.glob("*.json"))) == 3
    again = CellStore(tmp_path, {"budget": 240})
    assert again.done == {"woodfisher|0.9|0|pruning.woodfisher.damp=1e-3": {"test_accuracy": 0.9}}
    again.finish()
    assert store.path("woodfisher|0.9|0|pruning.woodfisher.damp=1e-3").is_file()  # cells stay


def test_rq3_validation_split_is_disjoint_from_test_set_training_and_fisher_samples() -> None:
    """The validation split comes from the training set, by index apart from what fine-tuning and the Fisher
    pool (whose samples the pruning steps evaluate gradients on) use, and shares no image with the test set."""
    from benchmarks.research.rq3_gradual import carve_validation
    from wf_pipeline.data import build_data
    from wf_pipeline.recipe.schema import DataConfig

    data = build_data(DataConfig(dataset="digits", fisher_pool=300, augment=False), seed=3)
    assert data.train_split is not None and data.test_split is not None
    carved = carve_validation(data, 200)
    n = len(data.train_split)
    validation, train, fisher = (set(i.tolist()) for i in (carved.validation_idx, carved.train_idx, carved.fisher_idx))
    assert len(validation) == 200 and validation.isdisjoint(train) and validation | train == set(range(n))
    assert fisher <= train and len(fisher) == 300 and validation.isdisjoint(fisher)
    split = carved.data
    assert split.train_split is not None and split.fisher_split is not None
    torch.testing.assert_close(split.fisher_split.images, data.train_split.images[carved.fisher_idx])
    torch.testing.assert_close(split.train_split.images, data.train_split.images[carved.train_idx])
    torch.testing.assert_close(carved.validation.images, data.train_split.images[carved.validation_idx])

    def contents(images: torch.Tensor) -> set[bytes]:
        return {image.numpy().tobytes() for image in images}

    held_out = contents(carved.validation.images)
    assert held_out.isdisjoint(contents(data.test_split.images))
    assert held_out.isdisjoint(contents(split.fisher_split.images))
    seen = [x for x, _ in split.fisher_batches(batch_size=50)()]  # what a pruning step's gradients see
    preprocessed = {x.numpy().tobytes() for x in data.preprocess(carved.validation.images)}  # type: ignore[misc]
    assert all(x.numpy().tobytes() not in preprocessed for batch in seen for x in batch)
    # the same draw for every run and method of a study: a fixed seed of its own
    assert torch.equal(carve_validation(data, 200).validation_idx, carved.validation_idx)


def test_reduction_names_what_a_run_left_out() -> None:
    from benchmarks.research.common import reduction

    full: dict[str, list[float]] = {"targets": [0.9, 0.95, 0.98], "seeds": [0, 1]}
    assert reduction(full, {"targets": [0.9, 0.95, 0.98], "seeds": [0, 1]}) is None
    assert reduction(full, {"targets": [0.9, 0.95], "seeds": [0, 1]}) == "targets 0.9, 0.95 of the full 0.9, 0.95, 0.98"


# ----------------------------------------------------------------------------- the whole pipeline, quick
def test_run_all_quick_produces_every_table_and_plot(tmp_path: Path) -> None:
    pytest.importorskip("curvlinops")
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\nbefore\n<!-- results:begin -->\nold block\n<!-- results:end -->\nafter\n")
    out = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run_all.py"), "--quick", "--out", str(out),
                           "--readme", str(readme)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["benchmark"] == "run_all" and set(summary["studies"]) == {"rq1", "rq2", "rq3", "rq4", "rq5"}
    for name in ("rq1_hessian_quality", "rq2_oneshot", "rq3_gradual", "rq4_layerwise", "rq5_limited_data"):
        for ext in (".md", ".json"):
            assert (out / f"{name}{ext}").stat().st_size > 0, name + ext
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert json.loads((out / f"{name}.json").read_text())["quick"] is True
    text = readme.read_text()
    assert "old block" not in text and text.startswith("# title\n\nbefore\n") and text.endswith("after\n")
    for rq in ("RQ1", "RQ2", "RQ3", "RQ4", "RQ5"):
        assert f"#### {rq}:" in text
    assert text.count("**Paper's claim:**") == 5 and "QUICK RUN" in text
    assert "](results/rq1_hessian_quality.png)" in text  # plot links relative to the README
    assert "](./rq1_hessian_quality.png)" in (out / "research.md").read_text()


def test_bundled_mobilenetv1_loads_by_its_builtin_name() -> None:
    """builtin:mobilenetv1-fmnist: the second model of the studies, with the accuracy its training recorded."""
    from wf_pipeline.models import build_model
    from wf_pipeline.models.zoo import BUILTIN_CHECKPOINTS
    from wf_pipeline.recipe.schema import ModelConfig

    cfg = ModelConfig(name="mobilenetv1", num_classes=10, in_channels=1, weights="builtin:mobilenetv1-fmnist",
                      kwargs={"width_mult": 0.25, "small_input": True})
    model = build_model(cfg).eval()
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    path = BUILTIN_CHECKPOINTS["mobilenetv1-fmnist"]
    assert path.stat().st_size < 1_500_000
    assert json.loads(path.with_suffix(".json").read_text())["test_accuracy"] > 0.85


# ----------------------------------------------------------------------------- "where they differ", cell by cell
STUDY_FILES = {"rq1": "rq1_hessian_quality", "rq2": "rq2_oneshot", "rq3": "rq3_gradual", "rq4": "rq4_layerwise",
               "rq5": "rq5_limited_data"}
REFERENCE_ROWS = {"exact Hessian H₊", "true Fisher", "dense"}  # yardsticks, not competitors


def differ_of(out: Path, key: str, markdown: str | None = None):  # -> (Differ, tables, text)
    from benchmarks import run_all
    from benchmarks.research.common import parse_tables

    name = STUDY_FILES[key]
    markdown = markdown if markdown is not None else (out / f"{name}.md").read_text()
    tables = parse_tables(markdown)
    _, _, differ = run_all.SECTIONS[key][1](json.loads((out / f"{name}.json").read_text()), tables)
    return differ, parse_tables(markdown), differ.text()


@pytest.mark.parametrize("key", list(STUDY_FILES))
def test_where_they_differ_quotes_its_own_tables_and_skips_no_cell(key: str) -> None:
    """Every cell a statement quotes is the cell of the table it describes, as printed and in the text; every
    result cell of every table is examined (reference rows apart, and only those)."""
    from benchmarks.research.common import mean_text

    differ, tables, text = differ_of(REPO / "results", key)
    for statement, cited in differ.statements:
        assert statement in text
        for cell in cited:
            assert tables[cell.table].rows[cell.row][cell.column] == cell.text, (statement, cell)
            assert mean_text(cell.text) in statement, (statement, cell)
    every = {(t, r, c) for t, table in enumerate(tables) for r, c in table.result_cells()}
    references = {(t, r) for t, table in enumerate(tables) for r, row in enumerate(table.rows)
                  if REFERENCE_ROWS & set(row)}
    assert differ.references == references
    skipped = {cell for cell in every if cell not in differ.examined and cell[:2] not in references}
    assert not skipped, f"{key}: cells no comparison looked at: " + ", ".join(
        f"{tables[t].header[c]} of {tables[t].rows[r][:2]}" for t, r, c in sorted(skipped))
    assert differ.examined <= every


def test_rq2_where_they_differ_names_every_cell_a_baseline_wins() -> None:
    """Independently of run_all: every (table, sparsity) where a baseline beats WoodFisher (joint) by more than
    0.5 points is named, and no other; a cell made contrary by hand is found."""
    from benchmarks.research.common import parse_tables, parse_value

    def expected(markdown: str) -> set[str]:
        names = set()
        for table in parse_tables(markdown):
            model = table.caption.split("**")[1]
            where = f"{model} {'with BN recalibration' if 'BatchNorm' in table.caption else 'as pruned'}"
            rows = {row[0]: row for row in table.rows}
            for c in range(1, len(table.header)):
                ours = parse_value(rows["WoodFisher (joint)"][c])
                best = max(parse_value(row[c])[0] for label, row in rows.items()  # type: ignore[index]
                           if not label.startswith(("WoodFisher", "WoodTaylor", "K-FAC")))
                if ours is not None and best > ours[0] + 0.5:
                    names.add(f"{where} at {table.header[c]}:")
        return names

    out = REPO / "results"
    markdown = (out / "rq2_oneshot.md").read_text()
    first = markdown.split("| WoodFisher (joint) | ", 1)
    edited = first[0] + "| WoodFisher (joint) | 1.00 ± 0.00 | " + first[1].split(" | ", 1)[1]  # 30%, first table
    for md in (markdown, edited):
        _, _, text = differ_of(out, "rq2", md)
        named = set(re.findall(r"((?:ResNet-20|MobileNetV1-0\.25) (?:as pruned|with BN recalibration) at \d+%:)",
                               text))
        assert named == expected(md)
    assert "ResNet-20 as pruned at 30%:" in differ_of(out, "rq2", edited)[2]


def test_research_blocks_are_generated_from_results() -> None:
    """docs/research.md's block and the README's research summary are what run_all.py builds from results/ (no
    hand edits, no stale text): rebuild with `benchmarks/run_all.py --no-run`."""
    from benchmarks import run_all

    out = REPO / "results"
    keys = [k for k, (_, name) in run_all.STUDIES.items() if (out / f"{name}.json").is_file()]
    runs = {k: {"seconds": run_all.load(out, run_all.STUDIES[k][1]).get("seconds", 0.0)} for k in keys}
    doc = REPO / "docs" / "research.md"
    block = run_all.results_block(out, keys, runs, doc.parent)
    assert f"{run_all.BEGIN}\n{block}\n{run_all.END}" in doc.read_text()
    summary = run_all.summary_block(out, doc, REPO)
    assert f"{run_all.SUMMARY_BEGIN}\n{summary}\n{run_all.SUMMARY_END}" in (REPO / "README.md").read_text()


def test_rq3_grid_value_equal_to_the_recipes_is_the_default_run() -> None:
    """A grid over the damping that includes the recipe's own λ reuses the default runs (no duplicate run
    under another name), and settings a method does not use give it only its default run."""
    from benchmarks.research.rq3_gradual import configurations, recipe_budget, recipe_values

    base = recipe_values(["pruning.woodfisher.damp", "finetune.optimizer.lr"], recipe_budget())
    assert base["pruning.woodfisher.damp"] == 1e-3
    grid = {"pruning.woodfisher.damp": ["1e-3", "0.01"]}
    assert configurations("woodfisher", grid, base) == [{}, {"pruning.woodfisher.damp": "0.01"}]
    assert configurations("magnitude", grid, base) == [{}]
    both = {**grid, "finetune.optimizer.lr": ["0.02", "0.05"]}
    assert len(configurations("woodfisher", both, base)) == 4
    assert configurations("magnitude", both, base) == [{}, {"finetune.optimizer.lr": "0.05"}]
    assert configurations("woodfisher", grid) == [{"pruning.woodfisher.damp": "1e-3"},
                                                  {"pruning.woodfisher.damp": "0.01"}]  # no base: as given


def test_summary_adds_the_full_budget_study_and_says_what_part_of_it_ran(tmp_path: Path) -> None:
    import json
    import shutil

    from benchmarks import run_all

    for path in (REPO / "results").glob("rq3_gradual.*"):
        shutil.copy(path, tmp_path / path.name)
    data = json.loads((tmp_path / "rq3_gradual.json").read_text())
    data |= {"full_budget": True, "reduced": "targets 0.95, 0.98 of the full 0.9, 0.95, 0.98",
             "budget": {**data["budget"], "finetune.epochs": 10, "finetune.steps_per_epoch": 180}}
    (tmp_path / "rq3_gradual_full.json").write_text(json.dumps(data))
    shutil.copy(tmp_path / "rq3_gradual.md", tmp_path / "rq3_gradual_full.md")
    reduced = run_all.gradual_sentence(tmp_path, "rq3_gradual")
    full = run_all.gradual_sentence(tmp_path, "rq3_gradual_full")
    assert "reduced from the default recipe's 1,800" in reduced and "a part of the study" not in reduced
    assert "1,800 optimizer steps, the default recipe's own budget" in full
    assert "a part of the study: targets 0.95, 0.98 of the full 0.9, 0.95, 0.98" in full


def test_rq3_a_configuration_run_on_fewer_seeds_cannot_be_chosen() -> None:
    from benchmarks.research.rq3_gradual import choose

    def row(config: dict[str, str], seed: int, validation: float) -> dict:
        return {"method": "woodfisher", "target": 0.98, "seed": seed, "config": config,
                "validation_accuracy": validation}

    rows = [row({}, s, 0.90) for s in range(3)] + [row({"pruning.woodfisher.damp": "0.01"}, 0, 0.99)]
    assert choose(rows, "woodfisher", 0.98) == ({}, 2)  # the better mean is one seed only
    rows += [row({"pruning.woodfisher.damp": "0.01"}, s, 0.99) for s in (1, 2)]
    assert choose(rows, "woodfisher", 0.98) == ({"pruning.woodfisher.damp": "0.01"}, 2)
