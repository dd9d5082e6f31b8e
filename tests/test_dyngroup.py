"""Dynamic grouping (WGM): the grouping algorithms, the dyngroup method's two forms, its bits."""
import itertools

import pytest
import torch

from qat.errors import QATError
from qat.methods import build_method
from qat.models.load import tiny_llama
from qat.nn import PackedLinear, bits_report, convert, prepare
from qat.ptq.gptq import gptq
from qat.ptq.initializers import initialize
from qat.quant.grouping import dp_cuts, gather_scales, group_ids, group_scales, grouping_objective


def starts_of(ids_sorted: torch.Tensor) -> list[int]:
    return [0] + (torch.nonzero(ids_sorted[1:] != ids_sorted[:-1])[:, 0] + 1).tolist()


def objective_of(w: torch.Tensor, ids: torch.Tensor, lam: float) -> float:
    order = torch.argsort(w.abs(), stable=True)
    return grouping_objective(w.abs()[order], starts_of(ids[order]), lam)


def test_dp_equals_brute_force_over_all_cut_points():
    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        n = int(torch.randint(2, 10, (), generator=gen))
        max_groups = int(torch.randint(1, 5, (), generator=gen))
        lam = [0.0, 1e-3, 0.75][trial % 3]
        a = torch.sort(torch.rand(n, generator=gen) * 0.1)[0]
        a[: trial % 3] = 0.0  # some inputs start with exact zeros
        brute = min(grouping_objective(a, [0, *cuts], lam)
                    for g in range(min(max_groups, n)) for cuts in itertools.combinations(range(1, n), g))
        cuts = dp_cuts(a, max_groups, lam)
        assert len(cuts) <= max_groups
        assert grouping_objective(a, cuts, lam) == pytest.approx(brute, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("groups", [2, 4])
@pytest.mark.parametrize("algorithm,window", [("greedy", 1), ("windowed", 16)])
def test_greedy_and_windowed_never_beat_dp_and_stay_close(groups, algorithm, window):
    """Measured on 2048 weights: within 2.3 % of the optimum at G <= 4 (docs/methods.md: at G = 8
    greedy merging and the Lloyd steps after it stay up to 30 % above it)."""
    gen = torch.Generator().manual_seed(1)
    for lam in (0.0, 0.75):
        for _ in range(2):
            w = torch.randn(2048, generator=gen) * 0.02
            w = w / w.abs().mean()  # group_ids groups magnitudes in units of their mean: the oracle too
            a = torch.sort(w.abs())[0]
            exact = grouping_objective(a, dp_cuts(a, groups, lam), lam)
            ids = group_ids(w[None], groups, algorithm, window, lam)[0]
            assert int(ids.max()) < groups
            got = objective_of(w, ids, lam)
            assert exact * (1 - 1e-9) <= got < exact * 1.05


def test_group_ids_are_ascending_in_magnitude_per_row():
    w = torch.randn(16, 96)
    ids = group_ids(w, 4, "greedy", scope="row", lambda_reg=0.0)
    for r in range(16):
        order = torch.argsort(w[r].abs())
        assert bool((ids[r][order].diff() >= 0).all())
        assert int(ids[r].max()) == 3


def test_zeros_get_a_zero_scale_and_are_reproduced_exactly():
    w = torch.randn(4, 64).sign() * (0.01 + torch.rand(4, 64) * 0.02)
    w[:, :32] = 0.0  # half the row pruned: a group of zeros (alpha 0) pays
    method = build_method("dyngroup", groups=4, algorithm="dp", scope="row", lambda_reg=0.0)
    state = method.init_state(w)
    q = method.fake_quant(state["latent"], {"group_ids": state["group_ids"]})
    assert bool((q[:, :32] == 0).all())
    assert not bool(torch.isnan(q).any())


@pytest.mark.parametrize("scope", ["matrix", "row"])
def test_one_group_is_rtn_binary(scope):
    w = torch.randn(8, 64)
    method = build_method("dyngroup", groups=1, scope=scope)
    state = method.init_state(w)
    q = method.fake_quant(state["latent"], {"group_ids": state["group_ids"]})
    if scope == "row":
        rtn = build_method("rtn_binary")
        buffers = {k: v for k, v in rtn.init_state(w).items() if k != "latent"}
        expected = rtn.fake_quant(w, buffers)  # per-row alpha = mean|w|
    else:
        expected = torch.where(w >= 0, 1.0, -1.0) * w.abs().mean().half().float()
    torch.testing.assert_close(q, expected, rtol=0, atol=0)


@pytest.mark.parametrize("scope", ["matrix", "row"])
def test_alpha_is_the_mean_magnitude_of_its_group_recomputed_each_forward(scope):
    torch.manual_seed(0)
    method = build_method("dyngroup", groups=4, scope=scope, lambda_reg=0.0)
    w = torch.randn(8, 128)
    state = method.init_state(w)
    ids = state["group_ids"].long()
    latent = state["latent"] * 1.5  # training moved the latent weights: alpha follows
    q = method.fake_quant(latent, {"group_ids": state["group_ids"]})
    rows = range(8) if scope == "row" else [slice(None)]
    for r in rows:
        for g in range(4):
            member = (ids[r] == g)
            if bool(member.any()):
                expected = latent[r][member].abs().mean().half().float()
                assert torch.equal(q[r][member].abs(), expected.expand(int(member.sum())))


def test_alpha_gets_gradients_through_the_ste():
    method = build_method("dyngroup", groups=3)
    w = torch.randn(4, 32)
    state = method.init_state(w)
    latent = state["latent"].requires_grad_()
    method.fake_quant(latent, {"group_ids": state["group_ids"]}).pow(2).sum().backward()
    assert latent.grad is not None and bool(latent.grad.abs().sum() > 0)


@pytest.mark.parametrize("groups,planes", [(1, 0), (2, 1), (4, 2), (5, 3), (32, 5)])
def test_storage_counts_the_group_ids_and_the_paper_count_leaves_them_out(groups, planes):
    method = build_method("dyngroup", groups=groups, scope="matrix")  # the paper's count: G scales per matrix
    model = tiny_llama({})
    prepare(model, method, initialize(model, method, "rtn", ["lm_head"]).states)
    convert(model)
    layer = next(m for m in model.modules() if isinstance(m, PackedLinear))
    assert layer.group_planes.shape[0] == planes
    bits = bits_report(model)
    n = bits["quantized_weights"]
    scale_bits = 16 * groups * sum(1 for m in model.modules() if isinstance(m, PackedLinear)) / n
    assert bits["weight"] == pytest.approx(1 + scale_bits)           # the paper's (n + 16·G)/n
    assert bits["storage"] >= 1 + planes + scale_bits                  # + padding of odd widths
    assert bits["storage"] < 1 + planes + scale_bits + 0.1


@pytest.mark.parametrize("scope", ["matrix", "row"])
def test_gptq_hand_over_is_exact(scope):
    torch.manual_seed(0)
    W = torch.randn(32, 256) * 0.02
    X = torch.randn(512, 256) @ torch.randn(256, 256) * 0.1
    H = 2 * X.t() @ X / X.shape[0]
    method = build_method("dyngroup", groups=4, scope=scope, lambda_reg=0.0)
    quantizer = method.gptq_quantizer(W, torch.ones(256), block_size=64)
    result = gptq(W, H, quantizer, block_size=64)
    state = method.state_from_gptq(result, quantizer.record())
    q = method.fake_quant(state["latent"], {"group_ids": state["group_ids"]})
    assert torch.equal(q, result.quantized)
    # error compensation pays: lower output error than the data-free grouping
    rtn = method.init_state(W)
    q_rtn = method.fake_quant(rtn["latent"], {"group_ids": rtn["group_ids"]})
    err = lambda Q: float(torch.trace((Q - W) @ H @ (Q - W).t()))  # noqa: E731
    assert err(q) < err(q_rtn)


@pytest.mark.parametrize("params,needle", [
    (dict(groups=0), "method.groups=0: must be an integer >= 1"),
    (dict(groups=300), "method.groups=300: at most 256"),
    (dict(window=0), "method.window=0: must be an integer >= 1"),
    (dict(algorithm="kmeans"), "unknown method.algorithm 'kmeans'; allowed: dp, greedy, windowed"),
    (dict(scope="column"), "unknown method.scope 'column'; allowed: matrix, row"),
    (dict(lambda_reg=-1.0), "method.lambda_reg=-1.0: must be a number >= 0"),
    (dict(regroup_every=-2), "method.regroup_every=-2: must be an integer >= 0"),
])
def test_bad_settings_are_clear_errors(params, needle):
    with pytest.raises(QATError) as e:
        build_method("dyngroup", **params)
    assert needle in str(e.value)


def test_dp_on_a_whole_matrix_is_refused_with_a_clear_error():
    method = build_method("dyngroup", algorithm="dp", scope="matrix")
    with pytest.raises(QATError, match="algorithm=dp is exact but O"):
        method.init_state(torch.randn(128, 128))


def test_regroup_follows_the_latent_weights():
    method = build_method("dyngroup", groups=2, lambda_reg=0.0)
    w = torch.randn(4, 64)
    ids = method.init_state(w)["group_ids"]
    moved = w.clone()
    moved[ids.bool()] *= 0.01  # the large-magnitude group shrinks below the rest
    assert not torch.equal(method.regroup(moved), ids)


def test_group_scales_of_empty_groups_are_zero():
    w = torch.randn(2, 8)
    ids = torch.zeros(2, 8, dtype=torch.long)
    s = group_scales(w, ids, 3, "row")
    assert torch.equal(s[:, 1:], torch.zeros(2, 2))


def test_tail_singletons_let_an_outlier_have_its_own_group():
    """Greedy merging from windows of 64 sorted magnitudes buries one outlier in its window's mean
    (the paper's WGM, tail=0); with the largest magnitudes starting as singletons it gets a group
    of its own. (Lloyd steps off: on real heavy-tailed rows they do not always recover it.)"""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 512, generator=gen) * 0.02
    w[:, 7] = 1.0
    for tail, exact in ((0, False), (64, True)):
        ids = group_ids(w, 4, "windowed", 64, 0.75, "row", 0, tail)
        q = torch.where(w >= 0, 1.0, -1.0) * gather_scales(group_scales(w, ids, 4, "row"), ids)
        assert torch.allclose(q[:, 7], w[:, 7]) == exact


@pytest.mark.parametrize("algorithm", ["dp", "windowed"])
def test_grouping_is_scale_free(algorithm):
    """lambda means the same at any weight scale: the same matrix at 0.02 and at 37 gets the same
    groups (with lambda in units of w², small weights merged far below G)."""
    w = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    ids = [group_ids(w * scale, 4, algorithm, window=8, lambda_reg=0.75, scope="row") for scale in (0.02, 1.0, 37.0)]
    assert torch.equal(ids[0], ids[1]) and torch.equal(ids[1], ids[2])


def test_results_record_the_groups_each_grouping_uses():
    from qat.nn import convert, layer_stats_report
    from qat.nn.qat_linear import QATLinear
    from qat.quant.grouping import groups_used

    assert groups_used(torch.tensor([[0, 0, 3], [1, 1, 1]]), 4, "row").tolist() == [2, 1]
    assert groups_used(torch.tensor([[0, 0, 3], [1, 1, 1]]), 4, "matrix").tolist() == [3]
    method = build_method("dyngroup", groups=4)
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(1)) * 0.02  # a real layer's scale
    model = torch.nn.Sequential(QATLinear(256, 8, method, method.init_state(w), None))
    convert(model)
    stats = layer_stats_report(model)["groups_used"]
    assert stats == {"min": 4.0, "mean": 4.0}  # every row uses all G scales it pays ids for
