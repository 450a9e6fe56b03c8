"""torchrun / DDP: the environment, the samplers, the synchronised BatchNorm and gathers
(2 gloo processes), and end to end: `torchrun --nproc-per-node 2 kacl pretrain` on the CPU
trains the same weights as one process with the same global batch, and a 2-rank `kacl cam`
equals the single-process run row for row, with rank 0 the only writer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kacl_cli.errors import KaclError
from kacl_cli.findings import FINDINGS
from kacl_cli.models.checkpoint import model_meta, save_checkpoint
from kacl_cli.models.image_net import GRAY_MEAN, GRAY_STD, build_image_net
from kacl_cli.stages.cam import stage as cam_stage
from kacl_cli.training import distributed
from kacl_cli.workspace import Workspace

torch.set_num_threads(1)
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
             "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID")


def torchrun(args: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 <args>`` with a clean, quiet environment."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(KACL_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


# -- single-process units --------------------------------------------------------------------
def test_env_context(monkeypatch) -> None:
    for var in DIST_VARS:
        monkeypatch.delenv(var, raising=False)
    ctx = distributed.from_env()
    assert (ctx.rank, ctx.world_size, ctx.active, ctx.is_main) == (0, 1, False, True)
    assert distributed.init("cpu") == ctx  # no torchrun: nothing to join
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(KaclError, match="MASTER_ADDR"):
        distributed.from_env()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert not distributed.from_env().is_main and not distributed.is_main()
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(KaclError, match="inconsistent torchrun environment"):
        distributed.from_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(KaclError, match="not an integer"):
        distributed.from_env()


def test_ranks_together_see_the_single_process_batches() -> None:
    data = list(range(26))
    single = distributed.EpochSampler(len(data), seed=5)
    ranks = [distributed.DistributedEpochSampler(data, 2, r, seed=5) for r in range(2)]
    for epoch in (0, 3):
        single.set_epoch(epoch)
        for s in ranks:
            s.set_epoch(epoch)
        order = list(single)
        per_rank = [list(s) for s in ranks]
        assert [len(p) for p in per_rank] == [13, 13]
        b = 4  # per-rank batch; the single process uses 2 x 4
        for k in range(3):
            step = set(per_rank[0][k * b:(k + 1) * b]) | set(per_rank[1][k * b:(k + 1) * b])
            assert step == set(order[k * 2 * b:(k + 1) * 2 * b])
    one = distributed.DistributedEpochSampler(data, 1, 0, seed=5)
    assert list(one) == list(distributed.EpochSampler(26, 5))
    assert list(distributed.shard_indices(7)) == list(range(7))


# -- collectives on 2 gloo processes ---------------------------------------------------------
COLLECTIVES = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from kacl_cli.training import distributed as D

    torch.set_num_threads(1)
    ctx = D.init("cpu")
    r, out = ctx.rank, {}
    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, 5) * 3 + 1
    coef = torch.randn(8, 3, 5, 5)
    ref = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5); ref.bias.uniform_(-1, 1)
    bn = D.convert_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3)), torch.device("cpu"))[0]
    bn.load_state_dict(ref.state_dict())
    xr = x.clone().requires_grad_()
    (ref(xr) * coef).sum().backward()
    xl = x[4 * r:4 * r + 4].clone().requires_grad_()
    y = bn(xl)
    (y * coef[4 * r:4 * r + 4]).sum().backward()
    wg = torch.stack([bn.weight.grad, bn.bias.grad])
    D.all_reduce_sum(wg, ctx)
    out["bn_type"] = type(bn).__name__
    out["y"] = float((y.detach() - torch.nn.functional.batch_norm(
        x, None, None, ref.weight.detach(), ref.bias.detach(), True)[4 * r:4 * r + 4]).abs().max())
    out["x_grad"] = float((xl.grad - xr.grad[4 * r:4 * r + 4]).abs().max())
    out["w_grad"] = float((wg - torch.stack([ref.weight.grad, ref.bias.grad])).abs().max())
    ref2 = torch.nn.BatchNorm2d(3); ref2(x)
    out["running"] = float(max((bn.running_mean - ref2.running_mean).abs().max(),
                               (bn.running_var - ref2.running_var).abs().max()))
    z = torch.arange(1.0, 7.0).reshape(3, 2).add(10 * r).requires_grad_()
    g = D.gather_with_grad(z)
    (g ** 2).sum().backward()
    out["gathered"] = g.detach().tolist()
    out["z_grad_ratio"] = float((z.grad / (2 * z.detach())).mean())
    labels, probs, loss = D.gather_eval(np.full((r + 1, 2), r), np.zeros((r + 1, 2)), 1.0 + r)
    out["eval"] = [labels[:, 0].tolist(), loss]
    out["objects"] = D.all_gather_object({"rank": r})
    out["bcast"] = D.broadcast_object("from-0" if r == 0 else None)
    D.barrier()
    json.dump(out, open(sys.argv[1] + f"/rank{r}.json", "w"))
    D.teardown()
""")


def test_sync_batchnorm_and_gathers_on_two_processes(tmp_path: Path) -> None:
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES)
    res = torchrun([str(script), str(tmp_path)], cwd=tmp_path, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    for r in range(2):
        out = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert out["bn_type"] == "DistBatchNorm"
        # forward, input gradients, parameter gradients and running statistics of the
        # synchronised BatchNorm on half the batch equal plain BatchNorm on the whole batch
        assert out["y"] < 1e-5 and out["x_grad"] < 1e-5 and out["w_grad"] < 1e-4
        assert out["running"] < 1e-5
        assert out["gathered"] == [[1, 2], [3, 4], [5, 6], [11, 12], [13, 14], [15, 16]]
        assert out["z_grad_ratio"] == pytest.approx(2.0)  # 2 ranks' identical losses summed
        assert out["eval"] == [[0, 1, 1], pytest.approx((1.0 + 2 * 2.0) / 3)]
        assert out["objects"] == [{"rank": 0}, {"rank": 1}] and out["bcast"] == "from-0"


# -- end to end ------------------------------------------------------------------------------
def test_two_rank_pretrain_equals_one_process_with_the_global_batch(tiny_workspace,
                                                                    tmp_path: Path) -> None:
    base = tiny_workspace(n=32, size=64)  # 16 train images: 2 steps of 8
    ddp_ws, one_ws = tmp_path / "ddp", tmp_path / "one"
    shutil.copytree(base.root, ddp_ws)
    shutil.copytree(base.root, one_ws)
    common = ["pretrain", "--backbone", "tiny", "--epochs", "1", "--no-augment", "--workers",
              "0", "--device", "cpu", "--lr", "1e-3", "--json"]
    res = torchrun(["-m", "kacl_cli.app", *common, "--batch-size", "4", "-w", str(ddp_ws)],
                   cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    ddp_summary = json.loads(res.stdout)  # one JSON document: only rank 0 reports
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    one = subprocess.run([sys.executable, "-m", "kacl_cli.app", *common, "--batch-size", "8",
                          "-w", str(one_ws)], env={**env, "KACL_NO_PROGRESS": "1"},
                         capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]
    one_summary = json.loads(one.stdout)
    assert ddp_summary["train_images"] == one_summary["train_images"] == 16

    init = build_init()
    a = load_file(ddp_ws / "checkpoints" / "round-0" / "model.safetensors")
    b = load_file(one_ws / "checkpoints" / "round-0" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        if not a[key].dtype.is_floating_point:
            continue
        moved = float((b[key] - init[key]).abs().max())
        diff = float((a[key] - b[key]).abs().max())
        assert moved > 0, key  # one epoch did train this tensor
        assert diff <= 0.1 * moved + 1e-6, f"{key}: DDP differs by {diff:.2e} (moved {moved:.2e})"
    # the val AUC came from predictions gathered over both ranks: the whole val split
    assert ddp_summary["val_mean_auc"] == pytest.approx(one_summary["val_mean_auc"], abs=1e-6)
    ws = Workspace(ddp_ws)
    assert ws.catalog.count("runs", "stage = 'pretrain'") == 1  # rank 1 recorded nothing
    assert ws.catalog.count("epochs") == 1


def build_init() -> dict[str, torch.Tensor]:
    """The initial weights pretrain starts from (seeded with --seed 0)."""
    torch.manual_seed(0)
    model = build_image_net("tiny", init="none")
    return {f"image_net.{k}": v for k, v in model.state_dict().items()}


def test_two_rank_cam_equals_the_single_process_rows(tiny_workspace, tmp_path: Path) -> None:
    ws = tiny_workspace(n=10, size=64)
    torch.manual_seed(1)
    model = build_image_net("tiny", n_classes=len(FINDINGS), init="none")
    save_checkpoint(ws.checkpoint_dir(0), {f"image_net.{k}": v for k, v in
                                          model.state_dict().items()},
                    model_meta("tiny", 64, 64, GRAY_MEAN, GRAY_STD, 0, "pretrain"))
    single = Workspace(shutil.copytree(ws.root, tmp_path / "single"))
    res = torchrun(["-m", "kacl_cli.app", "cam", "--round", "0", "--batch-size", "1",
                    "--device", "cpu", "--json", "-w", str(ws.root)], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)
    assert summary["images"] == 10 and summary["ranks"] == 2 and summary["computed"] == 10
    cam_stage.run_cam_stage(single, 0, device="cpu", batch_size=1)
    q = "SELECT * FROM cam_boxes ORDER BY image_id, finding"
    assert ws.catalog.query(q) == single.catalog.query(q)
    rows = np.arange(10)
    assert np.array_equal(ws.store.read_cams(0, rows), single.store.read_cams(0, rows))
    assert sorted(p.name for p in (ws.parts / "cam-round-0").iterdir()) == [
        "shard-0-of-2", "shard-1-of-2"]
    # again: every rank's part is skipped and the merge changes nothing
    res = torchrun(["-m", "kacl_cli.app", "cam", "--round", "0", "--batch-size", "1",
                    "--device", "cpu", "-w", str(ws.root)], cwd=tmp_path)
    assert res.returncode == 0 and "done, skipping" in res.stderr
    assert ws.catalog.query(q) == single.catalog.query(q)
