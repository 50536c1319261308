import math
from contextlib import nullcontext

import pytest
import torch
from torch import nn

from cigl.errors import InputError
from cigl.models import create_model
from cigl.sparse import METHODS, Masking, WeightAverage, drop_and_grow, recalibrate_bn
from cigl.sparse.allocation import erk_densities, layer_nnz, masked_parameters
from cigl.sparse.random_mask import sample_dropped, sample_size
from cigl.sparse.schedule import cosine_drop_fraction, is_update_step


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
    assert cosine_drop_fraction(0, 0.3, 1000) == pytest.approx(0.3)
    assert cosine_drop_fraction(500, 0.3, 1000) == pytest.approx(0.15)
    assert cosine_drop_fraction(250, 0.3, 1000) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert cosine_drop_fraction(1000, 0.3, 1000) == pytest.approx(0.0)
    assert [s for s in range(0, 1001) if is_update_step(s, 100, 750)] == [100, 200, 300, 400, 500, 600, 700]


def _masking(method="rigl", dpnum=None, density=0.1, model=None, **kw):
    torch.manual_seed(0)
    model = model or create_model("resnet20", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    return (
        model,
        opt,
        Masking(model, METHODS[method], density=density, dpnum=dpnum, update_every=1, update_until=1000, **kw),
    )


def _step(model, opt, masking, x, y, step):
    from cigl.train import train_step

    torch.manual_seed(step)
    return train_step(model, opt, masking, x, y, step, nullcontext)


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_nnz_constant_over_20_updates_and_masked_weights_zero(method):
    model, opt, masking = _masking(method, dpnum=10)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    before = {n: int(m.sum()) for n, m in masking.masks.items()}
    start = {n: m.clone() for n, m in masking.masks.items()}
    for step in range(1, 41):  # update_every=1 in _masking: every step is an update step
        masking.update_every = 1 if step % 2 else 10**6  # alternate update and SGD steps
        _step(model, opt, masking, x, y, step)
    assert {n: int(m.sum()) for n, m in masking.masks.items()} == before
    assert any(not torch.equal(start[n], m) for n, m in masking.masks.items())
    for n, p in masking.params.items():
        assert not p[~masking.masks[n]].any()
        assert not opt.state[p]["momentum_buffer"][~masking.masks[n]].any()


def test_rigl_grows_where_the_dense_gradient_is_largest():
    model, opt, masking = _masking("rigl")
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    name = "fc.weight"
    masking.masks[name].view(-1)[:320] = False  # give the classifier room to grow
    masking._refresh()
    with torch.no_grad():
        masking.params[name].mul_(masking.masks[name])
    old = masking.masks[name].clone()
    masking.begin_step()
    nn.functional.cross_entropy(model(x), y).backward()
    grad = masking.params[name].grad.clone()
    masking.update(1, opt)
    grown = masking.masks[name] & ~old
    if grown.any():
        inactive = ~old
        assert grad[grown].abs().min() >= grad[inactive & ~masking.masks[name]].abs().max()


def test_static_never_updates():
    _, _, masking = _masking("static")
    assert not any(masking.is_update_step(s) for s in range(2000))


@pytest.mark.parametrize("dpnum", [10, 100])
def test_random_mask_drop_rate_is_one_over_dpnum(dpnum):
    torch.manual_seed(1234)
    n = 1_000_000
    drawn = sample_dropped(n, dpnum)  # a fixed-size draw: the dropped, then spare slots n + slot
    assert drawn.numel() == sample_size(n, dpnum) and torch.all(drawn[1:] > drawn[:-1])
    pos = drawn[drawn < n]
    assert torch.equal(drawn[pos.numel() :], n + torch.arange(pos.numel(), drawn.numel()))
    p = 1 / dpnum
    sd = math.sqrt(n * p * (1 - p))
    assert abs(pos.numel() - n * p) < 4 * sd  # binomial count, fixed seed
    assert torch.all(pos[1:] > pos[:-1]) and pos.min() >= 0 and pos.max() < n
    # uniform over positions: each quarter of the range gets a quarter of the drops
    quarters = torch.bincount(pos // (n // 4), minlength=4).float()
    assert torch.all((quarters / pos.numel() - 0.25).abs() < 0.02)


def test_dpnum_is_honoured_and_expected_effective_weight_kept():
    _, _, masking = _masking(dpnum=10)
    assert masking.scale == pytest.approx(10 / 9)
    name = "layers.3.conv2.weight"
    p, mask = masking.params[name], masking.masks[name]
    w = masking.weights()[name]
    assert torch.equal(p, w * masking.scale) or torch.allclose(p, w * masking.scale, rtol=1e-6)
    total = torch.zeros_like(p)
    dropped = 0
    for i in range(400):
        torch.manual_seed(i)
        masking.begin_step()
        eff = p.detach().clone()  # what the forward pass sees: w * R * scale
        dropped += int(((eff == 0) & mask & (w != 0)).sum())
        total += eff
        masking.end_step()
    active = int((mask & (w != 0)).sum())
    assert dropped / (400 * active) == pytest.approx(0.1, abs=0.005)
    mean = total / 400
    assert torch.allclose(mean[mask], w[mask], rtol=0.12, atol=1e-3)
    assert not mean[~mask].any()  # effective weights never leave the mask
    assert torch.equal(masking.weights()[name], w)  # begin/end leave the weights as they were


def test_dropped_weights_unchanged_by_the_step():
    model, opt, masking = _masking(dpnum=10)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    masking.update_every = 10**6
    for step in range(1, 4):  # momentum builds up after the first step
        torch.manual_seed(step)
        before = {n: p.detach().clone() for n, p in masking.params.items()}
        masking.begin_step()
        seen = {n: p.detach().clone() for n, p in masking.params.items()}
        dropped = {n: (seen[n] == 0) & (before[n] != 0) for n in seen}
        nn.functional.cross_entropy(model(x), y).backward()
        masking.mask_gradients()
        opt.step()
        masking.end_step()
        opt.zero_grad()
        moved = 0
        for n, p in masking.params.items():
            assert torch.equal(p[dropped[n]], before[n][dropped[n]])
            live = ~dropped[n] & masking.masks[n]
            moved += int((p[live] != before[n][live]).sum())
        assert moved > 0 and sum(int(d.sum()) for d in dropped.values()) > 0


def test_sgd_on_scaled_weights_equals_sgd_on_weights():
    """u = scale * w with gradient scale^2 * dL/du and weight decay on u moves w like plain SGD
    (in float64, so that rounding cannot hide a wrong factor)."""
    torch.set_default_dtype(torch.float64)
    try:
        _compare_with_plain_sgd()
    finally:
        torch.set_default_dtype(torch.float32)


def _compare_with_plain_sgd():
    torch.manual_seed(0)
    model, opt, masking = _masking(dpnum=4, density=1.0)  # dense masks isolate the scaling
    masking.update_every = 10**6
    masking.dpnum = None  # no random drops: compare against the deterministic reference
    ref = create_model("resnet20", num_classes=10)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for n, w in masking.weights().items():
            dict(ref.named_parameters())[n].copy_(w)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    ref_start = {n: w.clone() for n, w in masking.weights().items()}
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(3):
        opt.zero_grad()
        masking.begin_step()
        nn.functional.cross_entropy(model(x), y).backward()
        masking.mask_gradients()
        opt.step()
        masking.end_step()
        ref_opt.zero_grad()
        # the reference sees the same effective weights: w * scale
        with torch.no_grad():
            for n in masking.params:
                dict(ref.named_parameters())[n].mul_(masking.scale)
        loss = nn.functional.cross_entropy(ref(x), y)
        loss.backward()
        with torch.no_grad():
            for n in masking.params:
                p = dict(ref.named_parameters())[n]
                p.div_(masking.scale)
                p.grad.mul_(masking.scale)  # dL/dw = scale * dL/d(w * scale)
        ref_opt.step()
    for n, w in masking.weights().items():
        assert torch.allclose(w, dict(ref.named_parameters())[n], rtol=1e-10, atol=1e-12), n
        assert not torch.allclose(w, ref_start[n], rtol=1e-3)  # and they did move


def test_rejects_bad_settings():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(144, 3))
    cases = [
        ({"dpnum": 1}, "dpnum must be an integer > 1"),
        (
            {"alpha": 2.0},
            r"alpha \(the share of a layer's weights exchanged per update\) must lie in \[0, 1\), got 2.0",
        ),
        ({"alpha": float("nan")}, "alpha .* must lie in"),
        ({"update_every": 0, "total_steps": 10}, "update_every must be an integer >= 1, got 0"),
        ({"total_steps": 2.5}, "total_steps must be an integer >= 1, got 2.5"),
        ({"density": 0.0}, r"density must lie in \(0, 1\]"),
    ]
    for settings, message in cases:
        with pytest.raises(InputError, match=message):
            Masking(model, "cigl", **{"density": 0.5} | settings)


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
    # snapshots of another model, or the average applied to one, are named instead of half-done
    with pytest.raises(InputError, match=r"1 missing, e.g. \['b'\].*fold snapshots of one model"):
        avg.fold({"w": torch.randn(5, 3)})
    with pytest.raises(InputError, match=r"the snapshot's w is \(3, 5\), the average's \(5, 3\)"):
        avg.fold({"w": torch.randn(3, 5), "b": torch.randn(3)})
    assert avg.count == 7
    model = nn.Linear(3, 5)
    with pytest.raises(InputError, match="2 not averaged.*apply it to the model its snapshots came from"):
        avg.apply_to(model)
    fitting = WeightAverage()
    fitting.fold({"weight": torch.ones(5, 3), "bias": torch.zeros(5)})
    fitting.apply_to(model)
    assert torch.equal(model.weight.detach(), torch.ones(5, 3))


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
    # no batches (an exhausted generator, say): refused before the statistics are reset
    with pytest.raises(InputError, match="got no batches"):
        recalibrate_bn(model, iter([]))
    assert torch.allclose(bn.running_mean, expected, atol=1e-5)


def _bookkeeping(masking):
    """One step's bookkeeping around a backward pass: draw R, mask the gradients, restore."""
    masking.begin_step()
    masking.mask_gradients()
    masking.end_step()


@pytest.mark.parametrize("dpnum", [10, None])
def test_bookkeeping_traces_as_one_graph(dpnum):
    """A step's bookkeeping has no host-device synchronisation and nothing of data-dependent
    shape (what CUDA graphs and sync-free CUDA steps need), checked on the CPU:
    torch.compile(fullgraph=True) traces it whole, and the traced step drops and restores
    exactly as the eager one does. (Up to commit 11ecb0e the CPU path read its draw back to the host.)"""
    results = []
    for compiled in (False, True):
        _, _, masking = _masking("rigl", dpnum=dpnum, density=0.2)
        for p in masking.params.values():
            p.grad = torch.ones_like(p)
        torch._dynamo.reset()
        run = torch.compile(_bookkeeping_seen, fullgraph=True, backend="eager") if compiled else _bookkeeping_seen
        torch.manual_seed(3)
        seen = run(masking)
        results.append((seen, [p.grad.clone() for p in masking.params.values()]))
    (seen, grads), (seen_c, grads_c) = results
    assert all(torch.equal(a, b) for a, b in zip(seen + grads, seen_c + grads_c, strict=True))
    if dpnum:
        zeroed = sum(int((w == 0).sum()) for w in seen)
        assert zeroed > sum(int((~m).sum()) for m in masking.masks.values())  # some active weights dropped


def _bookkeeping_seen(masking):
    """_bookkeeping, returning the weights the forward pass would have seen."""
    masking.begin_step()
    seen = [p.detach().clone() for p in masking.params.values()]
    masking.mask_gradients()
    masking.end_step()
    return seen


def _update_reference(masking, step, opt):
    """The mask update as written up to commit ac16192, layer by layer with host-side counts:
    int(share * nnz) dropped by topk of |w|, as many grown by topk of the scores."""
    share = cosine_drop_fraction(step, masking.alpha, masking.update_until)
    masks = {}
    for name, p in masking.params.items():
        n, m = int(share * masking.nnz[name]), masking.masks[name].reshape(-1).clone()
        if n:
            m[torch.topk(torch.where(m, p.detach().abs().reshape(-1), torch.inf), n, largest=False).indices] = False
            m[torch.topk(torch.where(m, -torch.inf, p.grad.abs().reshape(-1)), n).indices] = True
        masks[name] = m.view(p.shape)
    return masks


@pytest.mark.parametrize("dpnum", [10, None])
def test_mask_updates_trace_as_one_graph_and_exchange_what_topk_did(dpnum):
    """A mask update (drop and grow in every layer, momentum cleared, the random mask's active
    positions refreshed) has no host-device synchronisation and nothing of data-dependent
    shape, so a CUDA graph can capture the update step too: torch.compile(fullgraph=True)
    traces it whole on the CPU (it broke at torch.nonzero up to commit ac16192), and the traced
    and eager updates make the masks that per-layer topk with host-side counts made, weights
    and momentum zero outside them, over updates whose share falls as the schedule says."""
    results = []
    for compiled in (False, True):
        _, opt, masking = _masking("rigl", dpnum=dpnum, density=0.2)
        torch._dynamo.reset()
        update = torch.compile(masking.update, fullgraph=True, backend="eager") if compiled else masking.update
        seen = []
        torch.manual_seed(0)  # random weights, gradients and momentum: no ties for topk to break either way
        for step in (1, 250, 700):
            for name, p in masking.params.items():
                with torch.no_grad():  # as training leaves them: grown weights have moved off 0
                    p.copy_(torch.randn_like(p) * masking.masks[name])
                p.grad = torch.randn_like(p)
                opt.state[p]["momentum_buffer"] = torch.randn_like(p) * masking.masks[name]
            expected = _update_reference(masking, step, opt)
            update(step, opt)
            for name, p in masking.params.items():
                assert torch.equal(masking.masks[name], expected[name]), (step, name)
                assert (
                    not p[~masking.masks[name]].any()
                    and not opt.state[p]["momentum_buffer"][~masking.masks[name]].any()
                )
            seen.append({n: m.clone() for n, m in masking.masks.items()})
        assert masking.updates == 3 and masking.density() == pytest.approx(0.2, abs=1e-3)
        if dpnum:  # the active positions the random mask draws from: those of the new masks
            assert torch.equal(masking._active[: masking._nactive], torch.nonzero(masking._mask_flat).squeeze(1))
        results.append(seen)
    assert all(torch.equal(a[n], b[n]) for a, b in zip(*results, strict=True) for n in a)


def test_bookkeeping_drops_restores_and_masks_gradients():
    """Dropped weights come back unchanged after the step, their gradients are zero, the rest of
    the support gets scale^2 * grad, and about 1/DPNUM of the active weights drop."""
    _, _, masking = _masking("rigl", dpnum=10, density=0.2)
    before = {n: p.detach().clone() for n, p in masking.params.items()}
    shares = []
    for step in range(20):
        torch.manual_seed(step)
        masking.begin_step()
        zeroed = sum(int(((p == 0) & masking.masks[n]).sum()) for n, p in masking.params.items())
        shares.append(zeroed / sum(masking.nnz.values()))
        for p in masking.params.values():
            p.grad = torch.ones_like(p)
        masking.mask_gradients()
        for n, p in masking.params.items():
            active = p.grad[masking.masks[n]]
            assert (
                torch.isclose(active, torch.tensor(0.0))
                .logical_or(torch.isclose(active, torch.tensor(masking.scale**2)))
                .all()
            )
            assert not p.grad[~masking.masks[n]].any()
        masking.end_step()
        assert all(torch.equal(before[n], p) for n, p in masking.params.items())
    assert sum(shares) / len(shares) == pytest.approx(0.1, abs=0.01)


def _loop_sample(n, dpnum):
    """The sampler up to commit 11ecb0e: geometric gaps drawn chunk by chunk until they pass n."""
    p = 1.0 / dpnum
    mean = n * p
    chunk = int(mean + 6.0 * math.sqrt(mean) + 16)
    parts, last = [], -1.0
    while True:
        pos = last + torch.cumsum(torch.empty(chunk, dtype=torch.float64).geometric_(p), 0)
        if pos[-1] >= n:
            parts.append(pos[pos < n])
            return torch.cat(parts).long()
        parts.append(pos)
        last = float(pos[-1])


@pytest.mark.parametrize(("n", "dpnum"), [(26_832, 100), (500, 10), (3, 2)])
def test_fixed_size_draw_drops_what_the_loop_dropped(n, dpnum):
    """The fixed-size draw consumes the generator as the old chunked loop's first chunk did, so
    CPU runs drop the same weights as before (bit-identical training), bar a draw that falls
    short of n (probability < 1e-9, where the loop drew again)."""
    for seed in range(20):
        torch.manual_seed(seed)
        drawn = sample_dropped(n, dpnum)
        torch.manual_seed(seed)
        assert torch.equal(drawn[drawn < n], _loop_sample(n, dpnum))


def test_weights_share_one_buffer_until_finalize_and_moving_them_is_an_error():
    """With a random mask the masked weights are views of one flat buffer (the step's index
    list spans all layers); replacing them afterwards (model.to, a new memory format) would make
    the step drop nothing, so it fails with the fix; finalize gives each weight its own memory."""
    model, _, masking = _masking("rigl", dpnum=10)
    storages = {p.untyped_storage().data_ptr() for p in masking.params.values()}
    assert len(storages) == 1
    masking.begin_step()
    masking.end_step()
    masking.finalize()
    assert len({p.untyped_storage().data_ptr() for p in masking.params.values()}) == len(masking.params)
    model, _, masking = _masking("rigl", dpnum=10)
    model.to(memory_format=torch.channels_last)
    with pytest.raises(InputError, match="create Masking after moving and converting the model"):
        masking.begin_step()


@pytest.mark.parametrize("method,dpnum", [("rigl", None), ("set", None), ("rigl", 10)])
def test_a_finalized_masking_refuses_further_steps(method, dpnum):
    """After finalize() the weights are the model's own: a step or mask update would change a
    model whose masks are no longer enforced, so both stop with the fix instead."""
    model, opt, masking = _masking(method, dpnum=dpnum)
    masks = masking.finalize()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    before = {n: p.detach().clone() for n, p in masking.params.items()}
    for call in (lambda: masking.step(opt), lambda: masking.update(0, opt), masking.finalize):
        with pytest.raises(InputError, match="Masking was finalized.*create a new Masking"):
            call()
    assert all(torch.equal(p, before[n]) and torch.equal(masking.masks[n], masks[n]) for n, p in masking.params.items())


def test_a_new_masking_on_the_same_model_ends_the_one_before():
    """Running a notebook cell again makes a second Masking on the same model: the first is
    finalized (its forward hook would otherwise refuse the weights the second one moved), so
    training goes on with the second, and the weights are w, not the first one's u = scale * w."""
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10)
    first = Masking(model, "cigl", density=0.1, total_steps=20)
    expected = first.weights()
    with pytest.raises(InputError, match="density"):  # a Masking that fails its checks ends nothing
        Masking(model, "cigl", density=2.0, total_steps=20)
    assert not first.finalized
    second = Masking(model, "cigl", density=0.1, total_steps=20)
    assert first.finalized and not second.finalized
    assert all(torch.allclose(second.weights()[n], w * second.masks[n]) for n, w in expected.items())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 3, 32, 32)).sum().backward()  # the first Masking's hook is gone
    second.step(opt)
    with pytest.raises(InputError, match="Masking was finalized"):
        first.step(opt)


def test_lazy_layers_are_named_before_sparsifying():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(10))
    with pytest.raises(InputError, match="2.weight is not initialised yet .*run one forward pass"):
        Masking(model, "rigl", density=0.2, total_steps=10)
    model(torch.randn(1, 3, 8, 8))
    assert Masking(model, "rigl", density=0.2, total_steps=10).nnz["2.weight"] > 0


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten operators dispatched: on CUDA, each is at least one kernel launch."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dpnum", [100, None])
def test_bookkeeping_launches_a_few_kernels_for_all_layers(dpnum):
    """On CUDA a step's bookkeeping is launch-bound: one kernel per layer and operation cost
    ResNet-50 (54 masked layers) 5.3 ms a step on an H100, 22% of a dense step. One index list
    over all layers and a foreach multiply: the same few operators for any depth."""
    counts = {}
    for name in ("resnet20", "resnet50"):
        model = create_model(name, num_classes=10, image_size=32)
        masking = Masking(model, "rigl", density=0.1, dpnum=dpnum, update_until=1)
        for p in masking.params.values():
            p.grad = torch.ones_like(p)
        with _CountOps() as ops:
            _bookkeeping(masking)
        with _CountOps() as refresh:  # after every mask update: one host sync (nonzero), not one a layer
            masking._refresh()
        counts[name] = (len(masking.params), ops.count, refresh.count)
    assert counts["resnet50"][0] > 2 * counts["resnet20"][0]  # 54 layers against 22
    assert counts["resnet50"][1:] == counts["resnet20"][1:], counts
    assert counts["resnet50"][1] <= (14 if dpnum else 1) and counts["resnet50"][2] <= 6, counts
