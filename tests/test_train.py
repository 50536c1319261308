import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from functools import partial

import pytest
import torch
from conftest import (
    BLOCK_TORCH,
    RUN_FILES,
    TRAIN,
    assert_one_line_error,
    assert_same_model,
    load_pt,
    run_cli,
    wait_for_file,
)

from cigl.train import TrainConfig, lr_at, resolve, train


def test_dense_digits_reaches_90_percent_and_writes_the_run_dir(tmp_path):
    out = tmp_path / "dense"
    summary = train(TrainConfig(method="dense", epochs=8, out=str(out), batch_size=64), quiet=True)
    assert summary["test"]["accuracy"] >= 0.90
    assert {p.name for p in out.iterdir()} == set(RUN_FILES)
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "dense" and config["density"] == 1.0 and config["seed"] == 0
    assert config["decay_every"] == 3.2 and config["classes"] == [str(i) for i in range(10)]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 9))
    assert {
        "train_loss",
        "val_accuracy",
        "val_nll",
        "val_ece",
        "test_accuracy",
        "test_nll",
        "test_ece",
        "lr",
        "time_s",
    } <= set(rows[0])
    assert rows[-1]["test_accuracy"] == pytest.approx(summary["final_weights"]["test"]["accuracy"])
    model = load_pt(out / "model.pt")
    assert model["format"] == "cigl-model" and model["arch"] == "resnet20"
    assert model["temperature"] == pytest.approx(summary["temperature"]) and model["temperature"] > 0
    assert summary["test_calibrated"]["nll"] <= summary["test"]["nll"] + 0.02
    # the saved test predictions reproduce the summary through the audit tool
    audit = run_cli(
        "-c",
        "from cigl.serve.audit import main; raise SystemExit(main())",
        str(out / "predictions.npz"),
        "--temperature",
        "none",
        "--bootstrap",
        "0",
        "--json",
        "--out",
        str(tmp_path / "audit"),
    )
    measured = json.loads(audit.stdout)["models"]["predictions"]
    for name in ("accuracy", "ece", "nll", "brier", "mean_confidence"):  # one vocabulary in both files
        assert measured[name] == pytest.approx(summary["test"][name], abs=1e-6)


def test_lr_schedule():
    cfg = resolve(TrainConfig(epochs=10, lr=0.1, decay=0.5, decay_every=2, warmup_epochs=1))
    assert lr_at(cfg, 0, 10) == pytest.approx(0.01)
    assert lr_at(cfg, 9, 10) == pytest.approx(0.1)
    assert lr_at(cfg, 19, 10) == pytest.approx(0.1)
    assert lr_at(cfg, 20, 10) == pytest.approx(0.05)
    assert lr_at(cfg, 45, 10) == pytest.approx(0.025)


def test_same_seed_same_weights(tmp_path):
    a = train(TrainConfig(method="rigl", epochs=2, update_every=5, out=str(tmp_path / "a")), quiet=True)
    b = train(TrainConfig(method="rigl", epochs=2, update_every=5, out=str(tmp_path / "b")), quiet=True)
    assert a["test"] == b["test"]
    sa, sb = (
        load_pt(tmp_path / "a" / "model.pt")["state_dict"],
        load_pt(tmp_path / "b" / "model.pt")["state_dict"],
    )
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _stop_mid_run(args: list[str], out, sig: signal.Signals) -> subprocess.Popen:
    """Start cigl-train, send `sig` once its first checkpoint exists, wait for it to end."""
    proc = subprocess.Popen([sys.executable, TRAIN, *args, "--out", str(out)], stderr=subprocess.PIPE, text=True)
    wait_for_file(out / "last.pt", proc)
    time.sleep(0.3)
    proc.send_signal(sig)
    proc.wait()
    return proc


@pytest.mark.parametrize(("method", "stops"), [("dense", ["SIGKILL"]), ("cigl", ["SIGKILL", "SIGINT"])])
def test_kill_and_resume_gives_identical_weights(tmp_path, method, stops):
    """kill -9 at any point, or Ctrl-C (the run saves the step it reached and names the resume
    command), then --resume: the final weights are bit-identical to an uninterrupted run's."""
    args = ["--method", method, "--epochs", "4", "--batch-size", "16", "--update-every", "7"]
    args += ["--save-every-steps", "5", "--quiet"]
    full = run_cli(TRAIN, *args, "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    for stop in stops:
        out = tmp_path / stop
        proc = _stop_mid_run(args, out, signal.Signals[stop])
        assert not (out / "model.pt").exists()
        step = load_pt(out / "last.pt")["step"]
        assert 0 < step < 4 * 80
        if stop == "SIGINT":  # stopped between steps, saved there: nothing is lost
            lines = [line for line in proc.stderr.read().splitlines() if not line.startswith("warning: ")]
            assert proc.returncode == 130 and len(lines) == 1, lines
            assert lines[0] == f"interrupted: SIGINT at step {step} of 320; last.pt holds that step: " + (
                f"cigl-train --resume {out} continues"
            )
        else:
            assert proc.returncode == -signal.SIGKILL
        (out / ".last.pt.k1ll3d.tmp").write_bytes(b"PK")  # what a kill during a checkpoint's write leaves
        (out / ".notes.tmp").write_text("the user's")  # not cigl's: kept
        resumed = run_cli(TRAIN, "--resume", str(out), "--quiet")
        assert resumed.returncode == 0, resumed.stderr
        assert_same_model(tmp_path / "full" / "model.pt", out / "model.pt")
        assert [p.name for p in out.glob(".*.tmp")] == [".notes.tmp"]  # the resumed run cleared its own
        rows = (out / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(r)["epoch"] for r in rows] == [1, 2, 3, 4]


def test_a_stop_request_records_signals_and_gives_them_back():
    """SIGTERM (a scheduler's stop) is recorded like Ctrl-C, exits 143, and the first signal puts
    the previous handlers back, so a second one acts at once."""
    from cigl.train.interrupt import StopRequest

    before, before_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        assert not stop.requested() and signal.getsignal(signal.SIGTERM) != before
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested() and signal.getsignal(signal.SIGTERM) == before
        error = stop.interrupted(7, 10, "runs/x")
    assert error.exit_code == 143 and str(error).startswith("SIGTERM at step 7 of 10")
    # SIGINT's own handler is back too (Python's default, or SIG_IGN in a process started by nohup)
    assert isinstance(error, KeyboardInterrupt) and signal.getsignal(signal.SIGINT) is before_int


def test_resume_finds_moved_data_and_refuses_other_data(tmp_path, cifar_small):
    """config.json keeps the data folder as an absolute path, so a resume from another working
    directory finds it; data that moved is passed anew with --data-dir (and must be the same)."""
    shutil.copytree(cifar_small, tmp_path / "data")
    common = ["--model", "resnet20", "--train-per-class", "4", "--val-size", "0", "--batch-size", "20", "--quiet"]
    first_args = ["--dataset", "cifar10", "--data-dir", "data", *common, "--epochs", "1", "--out", "run"]
    first = run_cli(TRAIN, *first_args, cwd=tmp_path)  # paths relative to the working directory
    assert first.returncode == 0, first.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data_dir"] == str(tmp_path / "data")
    (tmp_path / "data").rename(tmp_path / "moved")
    gone = run_cli(TRAIN, "--resume", str(tmp_path / "run"), "--epochs", "2")
    assert_one_line_error(gone, f"its data folder {tmp_path / 'data'} is not there", "pass --data-dir")
    other = tmp_path / "other"
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            shutil.copytree(tmp_path / "moved" / split / name, other / split / name)
    wrong = run_cli(TRAIN, "--resume", str(tmp_path / "run"), "--epochs", "2", "--data-dir", str(other))
    assert_one_line_error(wrong, f"the data in {other} is not what the run was trained on (classes:")
    moved = run_cli(TRAIN, "--resume", str(tmp_path / "run"), "--epochs", "2", "--data-dir", str(tmp_path / "moved"))
    assert moved.returncode == 0, moved.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data_dir"] == str(tmp_path / "moved")
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


def test_resume_refuses_changed_settings_and_allows_more_epochs(tmp_path):
    out = tmp_path / "r"
    assert run_cli(TRAIN, "--method", "rigl", "--epochs", "1", "--out", str(out), "--quiet").returncode == 0
    proc = run_cli(TRAIN, "--resume", str(out), "--lr", "0.05")
    assert_one_line_error(proc, "--lr 0.1, not 0.05", "only --epochs, --data-dir (data that moved) and how the run")
    proc = run_cli(TRAIN, "--resume", str(out), "--epochs", "2", "--threads", "13", "--eval-every", "2")
    assert proc.returncode == 0, proc.stderr  # how a run executes may change, with a note where it matters
    assert "note: the run continues with device cpu, threads 13, compile False (checkpointed with device cpu" in (
        proc.stdout
    )
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    # all epochs done: only the final evaluation runs again, and its results are the same
    summary = (out / "summary.json").read_bytes()
    shutil.copy(out / "model.pt", tmp_path / "before.pt")
    done = run_cli(TRAIN, "--resume", str(out))
    assert done.returncode == 0, done.stderr
    assert f"resumed {out} at step 20 (all 2 epochs done)" in done.stdout
    assert (out / "summary.json").read_bytes() == summary
    assert_same_model(tmp_path / "before.pt", out / "model.pt")
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    again = run_cli(TRAIN, "--method", "rigl", "--epochs", "1", "--out", str(out))
    assert_one_line_error(again, "already holds a run", "--resume")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_checkpoint_needing_pickle_is_refused_not_run(tmp_path):
    out = tmp_path / "evil"
    assert run_cli(TRAIN, "--method", "dense", "--epochs", "1", "--out", str(out), "--quiet").returncode == 0
    marker = tmp_path / "pwned"
    with open(out / "last.pt", "wb") as f:
        pickle.dump({"format": "cigl-checkpoint", "x": _Payload(str(marker))}, f)
    proc = run_cli(TRAIN, "--resume", str(out))
    assert_one_line_error(proc, "cannot load", "safely")
    assert not marker.exists()
    (out / "last.pt").write_bytes(b"truncated")
    assert_one_line_error(run_cli(TRAIN, "--resume", str(out)), "cannot load")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--method", "cigl", "--epochs", "5", "--avg-start", "6"], "use an epoch from 1 to 5"),
        (["--method", "rigl", "--dpnum", "1"], "--dpnum must be an integer > 1"),
        (["--method", "dense", "--density", "0.1"], "drop --density 0.1"),
        (["--density", "1.5"], "--density must lie in (0, 1]"),
        (["--model", "nope_net"], "unknown model 'nope_net'"),
        (["--dataset", "cifar10"], "needs --data-dir"),
        (["--resume", "/nonexistent/run"], "no run there"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, args, needle):
    proc = run_cli(TRAIN, *args, "--out", str(tmp_path / "x")) if "--resume" not in args else run_cli(TRAIN, *args)
    assert_one_line_error(proc, needle)
    assert not (tmp_path / "x" / "last.pt").exists()


def test_a_usage_error_under_torchrun_is_said_once(monkeypatch, capsys):
    """Every process of a torchrun launch parses the same command line: rank 0 says what is
    wrong, the others exit 2 without repeating it."""
    from cigl.train.cli import build_parser

    for rank, said in (("0", True), ("3", False)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as stop:
            build_parser().parse_args(["--epochs", "many"])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert ("invalid int value: 'many'" in err and err.count("\n") == 1) == said and (said or not err)


def test_cigl_train_console_script_help():
    exe = os.path.join(os.path.dirname(sys.executable), "cigl-train")
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for option in ("--density", "--dpnum", "--lr", "--decay", "--avg-start", "--seed", "--resume"):
        assert option in proc.stdout


def test_import_cigl_without_torch():
    code = BLOCK_TORCH + (
        "import cigl, cigl.calibration, cigl.card, cigl.errors, cigl.data, cigl.images, cigl.runfiles, cigl.tables\n"
        "import cigl.serve.audit, cigl.serve.http, cigl.serve.predict, cigl.serve.predictor, cigl.serve.session\n"
        "import cigl.conformal, cigl.corruptions, cigl.selective\n"
        "import cigl.serve.audit_inputs, cigl.serve.guarantees, cigl.serve.report, cigl.serve.engines, cigl.packing\n"
        "import cigl.serve.sparse_engine, cigl.serve.sparse_engine.graph\n"
        "import numpy as np\n"
        "print(cigl.calibration.ece(np.array([[2.0, 0.0]]), np.array([0]), kind='logits'))\n"
        "assert 'torch' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) == pytest.approx(1 - 1 / (1 + torch.exp(torch.tensor(-2.0)).item()))


@pytest.mark.parametrize("method", ["static", "set", "rigl", "cigl"])
def test_each_sparse_method_trains_and_keeps_density(tmp_path, method):
    out = tmp_path / method
    summary = train(
        TrainConfig(method=method, density=0.2, epochs=6, batch_size=64, update_every=5, out=str(out)),
        quiet=True,
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    layers = json.loads((out / "config.json").read_text())["sparse_layers"]
    total = sum(r["numel"] for r in layers)
    assert sum(r["nnz"] for r in layers) / total == pytest.approx(0.2, rel=1e-3)
    assert all(r["density"] == pytest.approx(0.2, rel=1e-3) for r in rows)  # training masks
    assert summary["target_density"] == 0.2
    assert summary["final_weights"]["test"]["accuracy"] > 0.6
    model = load_pt(out / "model.pt")
    for layer in summary["layers"]:
        mask = model["masks"][layer["name"]]
        assert int(mask.sum()) == layer["nnz"]
        assert not model["state_dict"][layer["name"]][~mask].any()
    if method == "cigl":
        assert summary["product"] == "averaged" and "averaged" in summary
        assert json.loads((out / "config.json").read_text())["dpnum"] == 100
        # the average's support is the union of the averaged masks: a little above the target
        assert 0.19 < summary["actual_density"] < 0.3
    else:
        assert summary["product"] == "final_weights"
        assert summary["actual_density"] == pytest.approx(0.2, rel=1e-3)


def test_compile_trains_and_a_failing_compile_falls_back(tmp_path, monkeypatch, capsys):
    """--compile runs the model through torch.compile (inductor, on the CPU here); when
    compiling fails, the run goes on in eager mode with a one-line note."""
    cfg = TrainConfig(method="cigl", epochs=1, batch_size=64, train_per_class=40, update_every=2, compile=True)
    compiled = train(replace(cfg, out=str(tmp_path / "compiled")), quiet=True)
    eager = train(replace(cfg, compile=False, out=str(tmp_path / "eager")), quiet=True)
    assert compiled["final_weights"]["test"]["accuracy"] == pytest.approx(
        eager["final_weights"]["test"]["accuracy"], abs=0.1
    )

    def broken(module, **_):
        def call(*_):
            raise RuntimeError("no C++ compiler found\nmore detail")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    capsys.readouterr()
    fallback = train(replace(cfg, out=str(tmp_path / "fallback")), quiet=True)
    err = capsys.readouterr().err
    assert "note: torch.compile failed (no C++ compiler found); training without it" in err
    assert err.count("torch.compile failed") == 1
    assert fallback["final_weights"]["test"]["accuracy"] == pytest.approx(
        eager["final_weights"]["test"]["accuracy"], abs=1e-9
    )


class _Replayed:
    """A stand-in for a captured CUDA graph on the CPU: replay() runs the recorded body again
    and writes its loss where the capture's output was."""

    def __init__(self, body):
        self.body, self.loss = body, torch.zeros(())

    def replay(self):
        self.loss.copy_(self.body())


def _loop_with_graphs(graphed: bool, x: torch.Tensor, y: torch.Tensor) -> tuple:
    """24 steps of ResNet-20 with RigL masks (an update every 3rd step), through GraphedStep or
    all eager: (masking, model, which steps were replayed). Eager steps use GraphSGD too, so
    both loops do the same arithmetic (torch's SGD rounds differently, and a last-bit
    difference can flip a mask update's choice between near-equal weights)."""
    from contextlib import nullcontext

    from cigl.models import create_model
    from cigl.sparse import Masking
    from cigl.train import train_step
    from cigl.train.graphed import GraphedStep, GraphSGD

    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, image_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    masking = Masking(model, "rigl", density=0.2, update_every=3, update_until=40)

    def body(idx, optimizer, step, scheduled=False):
        return train_step(model, optimizer, masking, x[idx], y[idx], step, nullcontext, scheduled)

    graph = GraphedStep(partial(body, scheduled=True), opt, 16, masking.schedule_update) if graphed else None
    sgd = GraphSGD(opt, torch.tensor(0.1))
    replayed = []
    for step in range(1, 25):
        idx = torch.arange(16) + (step % 2) * 16
        torch.manual_seed(step)
        loss = graph.step(idx, 0.1, step, masking.is_update_step(step)) if graph is not None else None
        replayed.append(loss is not None)
        if loss is None:
            body(idx, sgd, step)
    return masking, model, replayed


def test_graphed_steps_and_mask_updates_train_as_eager_steps_do(monkeypatch):
    """GraphedStep's orchestration, on the CPU with a stand-in graph that re-runs its body at
    each replay: SGD steps replay after WARMUP eager ones, mask-update steps after one eager
    update, each replay of an update after schedule_update (counted once, at that step's share),
    the captured body doing only the device part (train_step(scheduled=True)). Masks, update
    count and weights then match a loop of eager train_step calls."""
    from cigl.train.graphed import WARMUP, GraphedStep, GraphSGD

    def capture(self, step, update=False):
        sgd = GraphSGD(self.optimizer, self.lr)
        fake = _Replayed(partial(self.body, self.idx, sgd, step))
        self.graphs[update], self.losses[update] = fake, fake.loss

    monkeypatch.setattr(GraphedStep, "capture", capture)
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,))
    eager, eager_model, _ = _loop_with_graphs(False, x, y)
    graphed, graphed_model, replayed = _loop_with_graphs(True, x, y)
    updates = [s for s in range(1, 25) if eager.is_update_step(s)]  # 3, 6, ..., 24
    eager_steps = [s for s in range(1, 25) if s not in updates][:WARMUP] + updates[:1]
    assert replayed == [s not in eager_steps for s in range(1, 25)]
    assert graphed.updates == eager.updates == len(updates)
    assert all(torch.equal(graphed.masks[n], eager.masks[n]) for n in eager.masks)
    assert all(torch.equal(a, b) for a, b in zip(graphed_model.parameters(), eager_model.parameters(), strict=True))


def test_graph_sgd_steps_exactly_as_torch_sgd():
    """The CUDA graph's SGD (learning rate read from a tensor) against torch.optim.SGD, on the
    same gradients: momentum, weight decay, a changing learning rate, a parameter without a
    gradient, and momentum buffers torch created before the switch."""
    from cigl.train.graphed import GraphSGD

    torch.manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7)), torch.nn.Parameter(torch.ones(2))]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    opt_ref = torch.optim.SGD(ref, lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt_ours = torch.optim.SGD(ours, lr=0.1, momentum=0.9, weight_decay=5e-4)
    lr = torch.zeros(())
    for step in range(6):
        grads = [torch.randn_like(p) for p in ref[:2]]  # the third parameter never gets one
        for params in (ref, ours):
            for p, g in zip(params, grads, strict=False):
                p.grad = g.clone()
        opt_ref.param_groups[0]["lr"] = 0.1 / (step + 1)
        if step < 2:  # torch's own steps create the momentum buffers first
            opt_ours.param_groups[0]["lr"] = 0.1 / (step + 1)
            opt_ours.step()
        else:
            lr.fill_(0.1 / (step + 1))
            GraphSGD(opt_ours, lr).step()
        opt_ref.step()
    for a, b in zip(ref, ours, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(opt_ref.state[ref[0]]["momentum_buffer"], opt_ours.state[ours[0]]["momentum_buffer"])
    assert torch.equal(ours[2], torch.ones(2))  # no gradient: untouched, as torch leaves it


def test_graph_capture_failure_falls_back_to_eager_with_one_note(capsys):
    """A step that cannot be captured (here: no CUDA at all) trains on eagerly after a one-line
    note, and capture is not retried; mask-update steps likewise, apart (their graph is
    captured at the second one, after the host's part of the update), and without a schedule
    they are never captured, with no note."""
    from cigl.train.graphed import WARMUP, GraphedStep

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: capture would not fail")
    model = torch.nn.Linear(3, 2)
    scheduled = []
    graph = GraphedStep(lambda idx, opt, step: None, torch.optim.SGD(model.parameters(), lr=0.1), 4, scheduled.append)
    idx = torch.arange(4)
    assert [graph.step(idx, 0.1, s) for s in range(WARMUP + 3)] == [None] * (WARMUP + 3)
    assert [graph.step(idx, 0.1, s, update=True) for s in range(3)] == [None] * 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.endswith("it runs eagerly") for line in err)
    assert err[0].startswith("note: CUDA graph capture of the step failed (")
    assert err[1].startswith("note: CUDA graph capture of the mask-update step failed (")
    assert graph.failed == {False: True, True: True} and graph.graph is None and not scheduled
    plain = GraphedStep(lambda idx, opt, step: None, torch.optim.SGD(model.parameters(), lr=0.1), 4)
    assert [plain.step(idx, 0.1, s, update=True) for s in range(3)] == [None] * 3
    assert not capsys.readouterr().err
