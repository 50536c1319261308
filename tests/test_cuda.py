"""CUDA code paths: run on a machine with a GPU, skipped (not failed) on CPU-only machines."""

import pytest
import torch

from cigl.train import TrainConfig, train

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@cuda
def test_cigl_trains_on_cuda_with_bf16_and_channels_last(tmp_path):
    summary = train(
        TrainConfig(method="cigl", device="cuda", epochs=4, batch_size=64, update_every=5, out=str(tmp_path / "run")),
        quiet=True,
    )
    assert summary["final_weights"]["test"]["accuracy"] > 0.6
    # one averaging fold: its random mask zeroes ~1/DPNUM of the weights (METHOD.md 3), as on CPU
    assert 0.1 * (1 - 1 / 100) - 0.001 <= summary["actual_density"] < 0.1


@cuda
def test_masking_keeps_density_on_cuda():
    from cigl.models import create_model
    from cigl.sparse import METHODS, Masking

    model = create_model("resnet20", num_classes=10).cuda().to(memory_format=torch.channels_last)
    masking = Masking(model, METHODS["rigl"], density=0.1, dpnum=100, update_every=1, update_until=100)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 3, 32, 32, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    for step in range(1, 5):
        masking.begin_step()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        masking.update(step, opt)
        opt.zero_grad()
    assert masking.density() == pytest.approx(0.1, rel=1e-3)
    for name, p in masking.params.items():
        assert not p[~masking.masks[name]].any()


@cuda
@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "graphed"])
@pytest.mark.parametrize("method", ["dense", "static", "set", "rigl", "cigl"])
def test_training_steps_and_mask_updates_never_synchronise(method, graphed):
    """The whole step as the trainer runs it (gather, augment, normalise, forward, backward,
    masking, SGD), and the mask-update step (drop and grow in every layer), eager and replayed as
    CUDA graphs, raise under CUDA's sync debug mode "error" if anything waits for the GPU. (Up
    to commit ac16192 a mask update read its active positions back with torch.nonzero.)"""
    from functools import partial

    from cigl.models import create_model
    from cigl.pipeline import augment, normalize
    from cigl.sparse import Masking
    from cigl.train import train_step
    from cigl.train.graphed import WARMUP, GraphedStep, graph_autocast

    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    masking = None
    if method != "dense":
        masking = Masking(model, method, density=0.1, update_every=2, update_until=10_000)
    images = torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8, device="cuda")
    labels = torch.randint(0, 10, (512,), device="cuda")
    order = torch.randperm(512, device="cuda")

    def amp():
        return torch.autocast("cuda", dtype=torch.bfloat16)

    def body(idx, optimizer, i, amp=amp, scheduled=False):
        x = normalize(augment(images[idx], 4, True), (0.5,) * 3, (0.25,) * 3).contiguous(
            memory_format=torch.channels_last
        )
        return train_step(model, optimizer, masking, x, labels[idx], i, amp, scheduled)

    graph = None
    if graphed:
        schedule = masking.schedule_update if masking is not None else None
        graph = GraphedStep(partial(body, amp=graph_autocast, scheduled=True), opt, 64, schedule)

    def step(i):
        idx = order[(i % 8) * 64 : (i % 8 + 1) * 64]
        update = masking is not None and masking.is_update_step(i)
        loss = graph.step(idx, 0.1, i, update) if graph is not None else None
        return body(idx, opt, i) if loss is None else loss

    # warm-up: allocations, cuDNN, optimiser state, and both captures (odd steps are SGD steps,
    # even ones mask updates: WARMUP eager SGD steps and one eager update before them)
    warm = 2 * WARMUP + 3 if graphed else 3
    for i in range(1, warm):
        step(i)
    if graph is not None:
        assert graph.graph is not None and (True in graph.graphs) == (method in ("set", "rigl", "cigl"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(warm, warm + 10):
            step(i)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@cuda
def test_a_mask_update_replayed_from_a_cuda_graph_exchanges_what_an_eager_one_does():
    """Masking.exchange captured once, at one share, and replayed after schedule_update at
    later steps (other shares, new weights, gradients and momentum in the same tensors): the
    masks, weights, momentum and the random mask's active positions equal those of an eager
    update of a twin from the same state."""
    from cigl.models import create_model
    from cigl.sparse import Masking

    def twin():
        torch.manual_seed(0)
        model = create_model("resnet20", num_classes=10).cuda()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        masking = Masking(model, "cigl", density=0.1, update_every=1, update_until=1000)
        for p in masking.params.values():
            p.grad = torch.zeros_like(p)
            opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
        return masking, opt

    def fill(masking, opt, seed):  # as training leaves them, in place (the graph reads these tensors)
        gen = torch.Generator(device="cuda").manual_seed(seed)
        with torch.no_grad():
            for name, p in masking.params.items():
                mask = masking.masks[name]
                p.copy_(torch.randn(p.shape, device="cuda", generator=gen) * mask)
                p.grad.copy_(torch.randn(p.shape, device="cuda", generator=gen))
                opt.state[p]["momentum_buffer"].copy_(torch.randn(p.shape, device="cuda", generator=gen) * mask)

    (graphed, g_opt), (eager, e_opt) = twin(), twin()
    for masking, opt in ((graphed, g_opt), (eager, e_opt)):
        fill(masking, opt, 0)
        masking.update(1, opt)  # the graphed twin's doubles as the warm-up before capturing
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.exchange(g_opt)
    for step, seed in ((300, 1), (700, 2), (740, 3)):
        fill(graphed, g_opt, seed)
        fill(eager, e_opt, seed)
        graphed.schedule_update(step)
        graph.replay()
        eager.update(step, e_opt)
        torch.cuda.synchronize()
        for name, p in graphed.params.items():
            q = eager.params[name]
            assert torch.equal(graphed.masks[name], eager.masks[name]), (step, name)
            assert torch.equal(p, q) and torch.equal(
                g_opt.state[p]["momentum_buffer"], e_opt.state[q]["momentum_buffer"]
            )
        assert torch.equal(graphed._active, eager._active) and graphed.churn() == eager.churn()


@cuda
def test_random_mask_in_a_cuda_graph_draws_anew_and_restores_at_every_replay():
    """The bookkeeping captured once: each replay draws another dropped set of about 1/DPNUM of
    the active weights (the generator advances inside the graph), zeroes it for the forward
    pass and puts every weight back afterwards."""
    from cigl.models import create_model
    from cigl.sparse import Masking

    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10).cuda().to(memory_format=torch.channels_last)
    masking = Masking(model, "cigl", density=0.2, dpnum=10, update_until=1)
    for p in masking.params.values():
        p.grad = torch.ones_like(p)
    before = {n: p.detach().clone() for n, p in masking.params.items()}
    seen = {}

    def body():
        masking.begin_step()
        seen.update({n: p.detach().clone() for n, p in masking.params.items()})
        masking.mask_gradients()
        masking.end_step()

    body()  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    dropped, active = [], sum(masking.nnz.values())
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        zeroed = sum(int(((seen[n] == 0) & m & (before[n] != 0)).sum()) for n, m in masking.masks.items())
        assert zeroed == pytest.approx(active / 10, rel=0.15)
        assert all(torch.equal(p, before[n]) for n, p in masking.params.items())
        dropped.append(masking._dropped.clone())
    assert not torch.equal(dropped[0], dropped[1]) and not torch.equal(dropped[1], dropped[2])


@cuda
@pytest.mark.parametrize("method", ["dense", "cigl"])
def test_cuda_graph_trains_as_the_eager_step_does(tmp_path, capsys, method):
    """The trainer with its step replayed as a CUDA graph (the default) against every step
    eager (--no-cuda-graph): the same losses and accuracy up to bf16 noise, no capture failure,
    and the support of the masks intact."""
    import json

    runs = {}
    for graphed in (True, False):
        cfg = TrainConfig(
            method=method, device="cuda", epochs=3, batch_size=64, cuda_graph=graphed, out=str(tmp_path / str(graphed))
        )
        runs[graphed] = train(cfg, quiet=True)
        rows = [json.loads(line) for line in (tmp_path / str(graphed) / "metrics.jsonl").read_text().splitlines()]
        runs[graphed]["losses"] = [r["train_loss"] for r in rows]
    assert "CUDA graph capture" not in capsys.readouterr().err
    graphed, eager = runs[True], runs[False]
    assert graphed["losses"] == pytest.approx(eager["losses"], rel=0.05), (graphed["losses"], eager["losses"])
    acc = {k: r["final_weights"]["test"]["accuracy"] for k, r in runs.items()}
    assert acc[True] > 0.6 and abs(acc[True] - acc[False]) < 0.05, acc
    assert graphed["actual_density"] == pytest.approx(eager["actual_density"], abs=0.002)


def test_cuda_request_without_a_gpu_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    from cigl.errors import InputError

    with pytest.raises(InputError, match="no CUDA device is available"):
        train(TrainConfig(device="cuda", out=str(tmp_path / "x")), quiet=True)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL)")
def test_torchrun_on_two_gpus_uses_nccl_and_keeps_masks_identical(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    train_py = Path(__file__).resolve().parents[1] / "tools" / "train.py"
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(train_py)]
        + ["--method", "cigl", "--device", "cuda", "--epochs", "4", "--batch-size", "64", "--update-every", "5"]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "masks identical on all 2 processes" in proc.stdout
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert json.loads((out / "summary.json").read_text())["final_weights"]["test"]["accuracy"] > 0.6
