import math

import pytest
import torch
from torch import nn

from cigl.models import create_model
from cigl.sparse import METHODS, Masking, WeightAverage, drop_and_grow, recalibrate_bn
from cigl.sparse.allocation import erk_densities, layer_nnz, masked_parameters
from cigl.sparse.random_mask import sample_dropped
from cigl.sparse.schedule import drop_fraction, is_update_step


def _shapes(name, **kw):
    model = create_model(name, num_classes=10, **kw)
    return {n: tuple(p.shape) for n, p in masked_parameters(model).items()}


@pytest.mark.parametrize("name", ["resnet20", "wrn22_2", "resnet50"])
@pytest.mark.parametrize("init", ["erk", "uniform"])
@pytest.mark.parametrize("density", [0.05, 0.1, 0.3])
def test_global_density_within_a_tenth_of_a_percent(name, init, density):
    shapes = _shapes(name)
    nnz = layer_nnz(shapes, density, init)
    total = sum(math.prod(s) for s in shapes.values())
    assert abs(sum(nnz.values()) / total - density) <= 0.001 * density
    assert all(1 <= nnz[n] <= math.prod(s) for n, s in shapes.items())


def test_masked_tensors_include_first_conv_and_classifier():
    names = list(_shapes("resnet20"))
    assert names[0] == "conv1.weight" and names[-1] == "fc.weight" and len(names) == 20


def test_erk_formula_and_dense_overflow():
    shapes = {"a": (4, 2), "b": (100, 100), "c": (64, 64, 3, 3)}
    dens = erk_densities(shapes, 0.2)
    assert dens["a"] == 1.0  # eps * 6/8 would exceed 1: made dense
    # the others keep ERK proportions: density ~ sum(shape)/prod(shape)
    ratio = dens["b"] / dens["c"]
    assert ratio == pytest.approx((200 / 10000) / (134 / (64 * 64 * 9)))
    total = sum(math.prod(s) for s in shapes.values())
    assert sum(dens[n] * math.prod(s) for n, s in shapes.items()) == pytest.approx(0.2 * total)


def test_drop_and_grow_picks_expected_indices():
    w = torch.tensor([[0.5, -0.1, 0.0, 0.9], [0.0, 0.3, -0.05, 0.0]])
    mask = w != 0
    grad = torch.tensor([[0.0, 0.0, 7.0, 0.0], [5.0, 0.0, 0.0, 1.0]])
    new = drop_and_grow(w, mask, grad.abs(), 2)
    # drop the two smallest active |w| (-0.05 at [1,2], -0.1 at [0,1]); grow the two largest
    # gradients among the inactive (7 at [0,2], 5 at [1,0])
    expected = torch.tensor([[True, False, True, True], [True, True, False, False]])
    assert torch.equal(new, expected)
    assert int(new.sum()) == int(mask.sum())


def test_drop_and_grow_may_regrow_a_just_dropped_weight():
    w = torch.tensor([1.0, 0.2, 0.0])
    new = drop_and_grow(w, w != 0, torch.tensor([0.0, 9.0, 1.0]), 1)
    assert torch.equal(new, torch.tensor([True, True, False]))


def test_cosine_schedule():
    assert drop_fraction(0, 0.3, 1000) == pytest.approx(0.3)
    assert drop_fraction(500, 0.3, 1000) == pytest.approx(0.15)
    assert drop_fraction(250, 0.3, 1000) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert drop_fraction(1000, 0.3, 1000) == pytest.approx(0.0)
    assert [s for s in range(0, 1001) if is_update_step(s, 100, 750)] == [100, 200, 300, 400, 500, 600, 700]


def _masking(method="rigl", dpnum=None, density=0.1, model=None, **kw):
    torch.manual_seed(0)
    model = model or create_model("resnet20", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    return (
        model,
        opt,
        Masking(model, METHODS[method], density=density, dpnum=dpnum, update_every=1, update_end=1000, **kw),
    )


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_nnz_constant_over_20_updates_and_masked_weights_zero(method):
    model, opt, masking = _masking(method)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    before = {n: int(m.sum()) for n, m in masking.masks.items()}
    start = {n: m.clone() for n, m in masking.masks.items()}
    for step in range(1, 21):
        torch.manual_seed(step)
        w = masking.effective_weights(step_random=False, keep_grad=True)
        loss = nn.functional.cross_entropy(torch.func.functional_call(model, w, (x,)), y)
        loss.backward()
        masking.update(step, {n: t.grad for n, t in w.items()}, opt)
        opt.zero_grad()
    assert {n: int(m.sum()) for n, m in masking.masks.items()} == before
    assert any(not torch.equal(start[n], m) for n, m in masking.masks.items())
    for n, p in masking.params.items():
        assert not p[~masking.masks[n]].any()


def test_static_never_updates():
    _, _, masking = _masking("static")
    assert not any(masking.is_update_step(s) for s in range(2000))


@pytest.mark.parametrize("dpnum", [10, 100])
def test_random_mask_drop_rate_is_one_over_dpnum(dpnum):
    torch.manual_seed(1234)
    n = 1_000_000
    pos = sample_dropped(n, dpnum)
    p = 1 / dpnum
    sd = math.sqrt(n * p * (1 - p))
    assert abs(pos.numel() - n * p) < 4 * sd  # binomial count, fixed seed
    assert torch.all(pos[1:] > pos[:-1]) and pos.min() >= 0 and pos.max() < n
    # uniform over positions: each quarter of the range gets a quarter of the drops
    quarters = torch.bincount(pos // (n // 4), minlength=4).float()
    assert torch.all((quarters / pos.numel() - 0.25).abs() < 0.02)


def test_dpnum_is_honoured_and_expected_effective_weight_kept():
    model, opt, masking = _masking(dpnum=10)
    assert masking.scale == pytest.approx(10 / 9)
    name = "layers.3.conv2.weight"
    p, mask = masking.params[name], masking.masks[name]
    total = torch.zeros_like(p)
    dropped = 0
    for i in range(400):
        torch.manual_seed(i)
        w = masking.effective_weights(step_random=True)[name].detach()
        dropped += int(((w == 0) & mask & (p != 0)).sum())
        total += w
        masking.restore_dropped()
    active = int((mask & (p != 0)).sum())
    assert dropped / (400 * active) == pytest.approx(0.1, abs=0.005)
    mean = total / 400
    assert torch.allclose(mean[mask], p[mask], rtol=0.12, atol=1e-3)
    # effective weights never leave the mask
    assert not mean[~mask].any()


def test_dropped_weights_unchanged_by_the_step():
    model, opt, masking = _masking(dpnum=10)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for step in range(3):  # build up momentum first
        torch.manual_seed(step)
        w = masking.effective_weights(step_random=True)
        nn.functional.cross_entropy(torch.func.functional_call(model, w, (x,)), y).backward()
        before = {n: p.detach().clone() for n, p in masking.params.items()}
        dropped_mask = {n: (t.detach() == 0) & masking.masks[n] & (before[n] != 0) for n, t in w.items()}
        masking.hold_dropped()
        opt.step()
        masking.restore_dropped()
        opt.zero_grad()
        moved = 0
        for n, p in masking.params.items():
            d = dropped_mask[n]
            assert torch.equal(p[d], before[n][d])
            moved += int((p[~d & masking.masks[n]] != before[n][~d & masking.masks[n]]).sum())
        assert moved > 0
    assert sum(int(m.sum()) for m in dropped_mask.values()) > 0
    # the multiplier is back to M * scale after restore
    assert torch.equal(masking._mult_views["fc.weight"], masking.masks["fc.weight"] * masking.scale)


def test_rejects_bad_dpnum():
    from cigl.errors import InputError

    with pytest.raises(InputError, match="dpnum must be an integer > 1"):
        _masking(dpnum=1)


def test_averaging_equals_mean_of_snapshots():
    avg = WeightAverage()
    snaps = [{"w": torch.randn(5, 3), "b": torch.randn(3)} for _ in range(7)]
    for s in snaps:
        avg.fold(s)
    for k in ("w", "b"):
        assert torch.allclose(avg.avg[k], torch.stack([s[k] for s in snaps]).mean(0), atol=1e-6)
    assert avg.count == 7
    restored = WeightAverage()
    restored.load_state_dict(avg.state_dict())
    assert torch.equal(restored.avg["w"], avg.avg["w"]) and restored.count == 7


def test_bn_recalibration_changes_stats_not_weights():
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = [torch.randn(16, 3, 32, 32) * 3 + 1 for _ in range(4)]
    recalibrate_bn(model, batches)
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n])
    bn = model.bn1
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
    # cumulative average over the batches: equals the batch-statistics mean of the first BN
    with torch.no_grad():
        expected = torch.stack([model.conv1(b).mean((0, 2, 3)) for b in batches]).mean(0)
    assert torch.allclose(bn.running_mean, expected, atol=1e-5)
    assert bn.momentum == 0.1 and model.training
