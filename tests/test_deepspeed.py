"""DeepSpeed ZeRO-1/2 through Accelerate (one process on CPU; multi-rank Accelerate + DeepSpeed runs
only on GPUs, Accelerate and DeepSpeed disagree on the process count with CPU processes): the joint baseline trains, clips, logs, checkpoints
and resumes exactly under each stage; GAAL, IGM and CGGM refuse DeepSpeed before any compute.

The first DeepSpeed run on a machine JIT-compiles DeepSpeed's CPU shared-memory comm op (about a
minute and a half on 2 cores, cached in ~/.cache/torch_extensions); later runs take ~15 s each.
"""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from data_prep import embedded
from tests.test_train import final_weights, free_port, seq3_args
from train import checkpoint, config, distributed

REPO = Path(__file__).resolve().parent.parent
LAUNCH_CONFIG = {stage: f"train/configs/accelerate/deepspeed_zero{stage}.yaml" for stage in (1, 2)}
# grad_clip small enough to act at every step, LR halved every epoch: both must survive DeepSpeed
CLIP_AND_SCHEDULE = ("--grad_clip", "0.05", "--scheduler", "step", "--step_size", "1", "--gamma", "0.5")


@pytest.fixture(scope="module")
def deepspeed_available():
    proc = subprocess.run([sys.executable, "-c", "import deepspeed"], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    if proc.returncode != 0:
        pytest.skip(f"deepspeed cannot be imported here: {proc.stderr.strip().splitlines()[-1:]}")


@pytest.fixture(scope="module")
def seq3_small(tmp_path_factory):
    """4 steps per epoch at batch 64: a stop at step 6 falls mid-way through the second epoch."""
    return embedded.generate(tmp_path_factory.mktemp("data"), "seq3", seed=3, n_train=256, n_val=64, n_test=64)


def run_deepspeed(stage, script, args, check=True):
    """`accelerate launch --config_file <shipped DeepSpeed ZeRO-stage config>`, one process."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", LAUNCH_CONFIG[stage],
           "--num_processes", "1", "--main_process_port", str(free_port()), str(REPO / script)]
    proc = subprocess.run(cmd + list(args), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} under ZeRO-{stage} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    values = []
    for ev in sorted((Path(run_dir) / "tb").iterdir()):
        acc = EventAccumulator(str(ev))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values += [e.value for e in acc.Scalars(tag)]
    return values


@pytest.fixture(scope="module")
def plain_run(seq3_small, tmp_path_factory):
    """The same training without DeepSpeed (one process, no launcher)."""
    out = tmp_path_factory.mktemp("plain") / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "train/joint.py"), *seq3_args(seq3_small, out, *CLIP_AND_SCHEDULE)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage, precision", [(1, "no"), (2, "no"), (2, "bf16")])
def test_joint_under_zero_trains_and_resumes_exactly(stage, precision, deepspeed_available, seq3_small, plain_run,
                                                     tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    extra = CLIP_AND_SCHEDULE + (("--mixed_precision", "bf16") if precision == "bf16" else ())
    proc = run_deepspeed(stage, "train/joint.py", seq3_args(seq3_small, whole, *extra))
    assert (f"[deepspeed] ZeRO stage {stage}: micro batch 64 x 1 processes, gradient_clipping 0.05 (grad_clip), "
            f"bf16 {'on' if precision == 'bf16' else 'off'}") in proc.stdout
    result = json.loads((whole / "result.json").read_text())
    assert set(result["test"]) == {"text", "audio", "vision", "fused"}
    best = torch.load(whole / "best.pt", weights_only=True)   # float32 master weights, also under bf16
    assert best and all(v.dtype == torch.float32 for v in best.values() if v.is_floating_point())
    ckpt = whole / "checkpoints" / (whole / "checkpoints" / "latest").read_text().strip()
    assert (ckpt / "deepspeed").is_dir() and torch.load(ckpt / "state.pt", weights_only=False)["deepspeed_stage"] == stage

    # float32: the same updates as without DeepSpeed: grad_clip acted (DeepSpeed's gradient_clipping;
    # ignoring it moves the weights by ~1e-2), the scheduler's LR reached the engine, and the
    # head-gradient diagnostics read the full (clipped) gradients. bf16: close to them.
    a, b = final_weights(plain_run), final_weights(whole)
    assert a.keys() == b.keys()
    tol = 1e-5 if precision == "no" else 2e-2
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=tol, atol=tol, msg=key)
    for tag in ("text/cos_head_grad_own_vs_fused", "audio/grad_norm_encoder"):
        plain, ds = scalars(plain_run, tag), scalars(whole, tag)
        assert len(ds) == len(plain) == 2 and ds == pytest.approx(plain, rel=1e-4 if precision == "no" else 5e-2), tag

    # stopped mid-epoch 2 and resumed == uninterrupted, bit for bit (optimizer partitions, LR, RNG)
    stopped = run_deepspeed(stage, "train/joint.py", seq3_args(seq3_small, split, *extra, "--stop_after_steps", "6"))
    assert "stop_after_steps=6 at step 6" in stopped.stdout
    run_deepspeed(stage, "train/joint.py", seq3_args(seq3_small, split, *extra, "--resume"))
    c = final_weights(split)
    for key in b:
        assert torch.equal(b[key], c[key]), key
    assert json.loads((split / "result.json").read_text())["test"] == result["test"]


@pytest.mark.slow
@pytest.mark.parametrize("script, method, stage", [("train/gaal.py", "GAAL", 2), ("train/igm.py", "IGM", 1),
                                                   ("train/cggm.py", "CGGM", 2)])
def test_methods_refuse_deepspeed_before_compute(script, method, stage, deepspeed_available, tmp_path):
    out = tmp_path / "run"
    proc = run_deepspeed(stage, script, ["--out_dir", str(out), "--data", str(tmp_path / "never_read")], check=False)
    assert proc.returncode != 0
    assert f"error: {method} does not support DeepSpeed (ZeRO stage {stage})" in proc.stderr
    assert f"accelerate launch --multi_gpu --num_processes N {script}" in proc.stderr
    assert not out.exists()   # no run directory, no checkpoint


# ------------------------------------------------------------------------------------------------
# the checks themselves, without a launch (a stand-in for a DeepSpeed Accelerator)

def fake_accelerator(ds_config, num_processes=1):
    from accelerate.utils import DistributedType
    printed = []
    return SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED if ds_config is not None else DistributedType.NO,
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds_config)),
        num_processes=num_processes, device=torch.device("cpu"), printed=printed,
        print=lambda *a: printed.append(" ".join(map(str, a))))


def shipped(stage, bf16=False):
    ds = json.loads((REPO / f"train/configs/deepspeed/zero{stage}.json").read_text())
    ds["bf16"]["enabled"] = bf16   # what Accelerate fills from mixed_precision
    return ds


RUN = dict(batch_size=64, grad_clip=0.5, mixed_precision="no")


@pytest.mark.parametrize("stage", [1, 2])
def test_refusal_names_method_stage_reason_and_alternative(stage):
    with pytest.raises(config.ConfigError) as err:
        distributed.refuse_deepspeed(fake_accelerator(shipped(stage)), "IGM", "it multiplies gradients by T")
    text = str(err.value)
    assert f"IGM does not support DeepSpeed (ZeRO stage {stage}): it multiplies gradients by T" in text
    assert "inside accelerator.backward()" in text and "accelerate launch --multi_gpu" in text
    assert ("partitions the reduced gradients" in text) == (stage == 2)
    distributed.refuse_deepspeed(fake_accelerator(None), "IGM", "unused")   # no DeepSpeed: nothing to refuse


def test_configure_fills_auto_from_the_run_config():
    acc = fake_accelerator(shipped(2), num_processes=4)
    model = torch.nn.Linear(3, 2)
    assert distributed.configure_deepspeed(acc, RUN, model) == 2
    ds = acc.state.deepspeed_plugin.deepspeed_config
    assert (ds["train_micro_batch_size_per_gpu"], ds["train_batch_size"], ds["gradient_clipping"]) == (16, 64, 0.5)
    assert "gradient_clipping 0.5" in acc.printed[0] and "bf16 off" in acc.printed[0]
    assert distributed.configure_deepspeed(fake_accelerator(None), RUN, model) is None


def test_configure_bf16_wraps_the_forward_in_autocast():
    model = torch.nn.Linear(3, 2)
    distributed.configure_deepspeed(fake_accelerator(shipped(1, bf16=True)), dict(RUN, mixed_precision="bf16"), model)
    model.to(torch.bfloat16)   # what DeepSpeed's bf16 does to the module
    out = model(torch.randn(5, 3))   # float32 input works, float32 output
    assert out.dtype == torch.float32


@pytest.mark.parametrize("change, run_change, message", [
    ({"gradient_clipping": 1.0}, {}, "gradient_clipping=1.0 disagrees with grad_clip"),
    ({"train_micro_batch_size_per_gpu": 8}, {}, "train_micro_batch_size_per_gpu=8 disagrees"),
    ({"gradient_accumulation_steps": 4}, {}, "gradient_accumulation_steps=4 disagrees"),
    ({"optimizer": {"type": "Adam"}}, {}, "remove 'optimizer'"),
    ({"zero_optimization": {"stage": 3}}, {}, "ZeRO stage 3: only stages (1, 2)"),
    ({}, {"mixed_precision": "fp16"}, "mixed_precision=fp16: under DeepSpeed use bf16 or no"),
    ({"bf16": {"enabled": True}}, {}, "disagree with mixed_precision=no"),
])
def test_configure_refuses_what_it_would_otherwise_ignore(change, run_change, message):
    with pytest.raises(config.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        distributed.configure_deepspeed(fake_accelerator(shipped(2) | change), RUN | run_change, torch.nn.Linear(3, 2))


def test_checkpoint_from_deepspeed_refuses_a_plain_resume(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "ckpt-000000006").mkdir(parents=True)
    torch.save({"trainer": {"step": 6}, "world_size": 1, "deepspeed_stage": 2}, root / "ckpt-000000006" / "state.pt")
    (root / "latest").write_text("ckpt-000000006\n")
    with pytest.raises(RuntimeError, match="written under DeepSpeed ZeRO-2 but this run does not use DeepSpeed"):
        checkpoint.load_checkpoint(tmp_path, fake_accelerator(None), {"model": torch.nn.Linear(2, 2)})
