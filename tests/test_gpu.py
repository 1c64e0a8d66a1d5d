"""GPU smoke tests (issue 17): every training script on one CUDA GPU with the GPU path on (bf16
autocast, channels_last where the script has the key, the fused optimiser that train/optim.py picks
by itself when every parameter is on CUDA), checkpoint + resume against an uninterrupted run, and no
host synchronisation inside the methods' steps on CUDA.

Every test marked `gpu` is deselected by default (pytest.ini) and skipped without CUDA:

    python -m pytest -q -m gpu tests/test_gpu.py        # on a device session (benchmarks/gpu_check.sh)

The argument lists (`SCRIPTS`, `script_args`) are shared with two CPU tests that run by default:
one script (GAAL) on CPU with `--mixed_precision 'no' --channels_last false` through the same
checkpoint/resume sequence (bit-exact there), and benchmarks/gpu_check.sh --dry-run.
The device augmentation on CUDA against its CPU result is tests/test_augment.py
(test_cuda_no_host_sync_and_matches_cpu), not repeated here.
"""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_prep import embedded
from tests.test_train import final_weights, run_script

REPO = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()

# tiny: 128 training samples at batch 32 = 4 steps per epoch, 2 epochs = 8 updates; the split run
# stops after 5 (inside the second epoch, so the resume restores a mid-epoch sampler position)
N_TRAIN, BATCH, STOP = 128, 32, 5
LR = 1e-3
COMMON = ["--batch_size", str(BATCH), "--eval_batch_size", "64", "--log_every", "2", "--progress", "false",
          "--optimizer", "adam", "--lr", str(LR)]
SMALL_SEQ = [a for m in ("text", "audio", "vision") for a in (f"--encoders.{m}.n_layers", "1")]
SMALL_AV = ["--encoders.audio.base_width", "8", "--encoders.video.base_width", "8"]

# name -> (script, embedded flavour, has the channels_last key, script-specific arguments)
SCRIPTS = {
    "joint": ("train/joint.py", "imgtab", False, ["--epochs", "2"]),
    "unimodal": ("train/unimodal.py", "imgtab", False, ["--epochs", "2", "--modalities", "[image]"]),
    "gaal": ("train/gaal.py", "imgtab", True, ["--epochs", "2"]),
    "igm official": ("train/igm.py", "av", True, ["--variant", "official", "--stage_epochs", "[1, 1]", *SMALL_AV]),
    "igm paper": ("train/igm.py", "av", True, ["--variant", "paper", "--epochs", "2", "--rho", "0.05",
                                               "--refresh_every", "3", *SMALL_AV]),
    "cggm official": ("train/cggm.py", "seq3", False, ["--variant", "official", "--epochs", "2", "--d_model", "32",
                                                       *SMALL_SEQ]),
    "cggm paper": ("train/cggm.py", "seq3", False, ["--variant", "paper", "--epochs", "2", "--d_model", "32",
                                                    *SMALL_SEQ]),
    # the papers' comparison baselines: official rows (and MLA's paper row: the official projection never
    # runs, so only the paper row carries a projector P through the checkpoint)
    "ogm_ge official": ("train/ogm_ge.py", "av", False, ["--variant", "official", "--epochs", "2", *SMALL_AV]),
    "mla official": ("train/mla.py", "av", False, ["--variant", "official", "--epochs", "2", *SMALL_AV]),
    "mla paper": ("train/mla.py", "av", False, ["--variant", "paper", "--epochs", "2", *SMALL_AV]),
    "mmpareto official": ("train/mmpareto.py", "av", False, ["--variant", "official", "--epochs", "2", *SMALL_AV]),
}


def script_args(name, data, out, device="cuda", *extra):
    """The full argument list of SCRIPTS[name]: on "cuda" the GPU path (bf16, channels_last where the
    script has it; the fused optimiser is automatic), on "cpu" the same run in fp32 NCHW on the CPU."""
    _, _, has_channels_last, own = SCRIPTS[name]
    if device == "cuda":
        path = ["--mixed_precision", "bf16"] + (["--channels_last", "true"] if has_channels_last else [])
    else:
        path = ["--mixed_precision", "no", "--cpu", "true"]
        path += ["--channels_last", "false"] if has_channels_last else []
    return ["--data", str(data), "--out_dir", str(out), *COMMON, *own, *path, *extra]


def run_dir(name, out):
    """Where the checkpoints are: unimodal runs go to <out_dir>/<modality>."""
    return out / "image" if name == "unimodal" else out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {flavour: embedded.generate(root, flavour, seed=7, n_train=N_TRAIN, n_val=64, n_test=64)
            for flavour in ("imgtab", "av", "seq3")}


def whole_and_resumed(name, data, tmp_path, device):
    """Run SCRIPTS[name] uninterrupted, and again stopped after STOP steps then resumed; return both
    final checkpoints' weights and the stop run's stdout."""
    script, flavour, _, _ = SCRIPTS[name]
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_script(script, script_args(name, data[flavour], whole, device))
    stopped = run_script(script, script_args(name, data[flavour], split, device, "--stop_after_steps", str(STOP)))
    assert f"stop_after_steps={STOP} at step {STOP}" in stopped.stdout + stopped.stderr
    run_script(script, script_args(name, data[flavour], split, device, "--resume"))
    a, b = final_weights(run_dir(name, whole)), final_weights(run_dir(name, split))
    assert a.keys() == b.keys()
    return a, b


# ------------------------------------------------------------------------------------------------ CPU
@pytest.mark.slow
def test_argument_lists_are_valid_on_cpu(data, tmp_path):
    """The GPU tests' argument lists, run for GAAL on CPU (fp32, NCHW): they parse, train, checkpoint
    and resume; on CPU every kernel here is deterministic, so the resumed run is bit-exact."""
    a, b = whole_and_resumed("gaal", data, tmp_path, "cpu")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    config = (tmp_path / "whole" / "config.yaml").read_text()
    assert "mixed_precision: 'no'" in config or "mixed_precision: no" in config


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """benchmarks/gpu_check.sh --dry-run: the same stages on CPU at tiny sizes (pytest collection of
    the gpu tests, perf.py's fastest CPU setting) into $OUT, with the summary file."""
    out = tmp_path / "check"
    env = dict(os.environ, OUT=str(out), PYTHONPATH=str(REPO), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    for stage in ("versions", "nvidia-smi", "pytest", "perf"):
        assert any(line.startswith(f"{stage} ") for line in summary.splitlines()), (stage, summary)
    assert "mode: dry-run" in summary
    for line in summary.splitlines():
        if line.startswith(("pytest ", "perf ", "versions ")):
            assert " rc=0 " in line, line
    for f in ("versions.txt", "nvidia-smi.txt", "pytest.log", "pytest-junit.xml", "perf.log", "perf.md"):
        assert (out / f).is_file(), f
    assert "test_gpu.py" in (out / "pytest.log").read_text()
    assert (out / "perf.md").read_text().startswith("Machine: ")


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.parametrize("name", list(SCRIPTS))
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_script_on_gpu_resumes_where_an_uninterrupted_run_ends(name, data, tmp_path):
    """bf16 + channels_last (gaal, igm) + fused Adam, 8 updates, stop after 5, resume: the final
    weights match the uninterrupted run's to atol=LR (1e-3), rtol=1.6e-2.

    Why not bit-exact: the two runs are different processes, and on CUDA some kernels of these models
    are not run-to-run deterministic (the scripts do not call torch.use_deterministic_algorithms):
    cuDNN convolution backward (weight and data gradients; the algorithm cuDNN picks may accumulate
    with atomics, and its choice can differ between processes) in the ResNets of joint / unimodal /
    GAAL / IGM / OGM-GE / MLA / MMPareto, adaptive average pooling backward (atomicAdd), index/scatter-add backward (embedding
    and gather gradients in the sequence encoders of CGGM), and cuBLAS split-K reductions whose order
    depends on the heuristics. Each reorders fp32 sums (last-bit differences); under bf16 autocast such a
    difference can flip the rounding of an operand to bf16 (resolution 2^-8 ~ 0.4 %), so gradients of
    two otherwise identical runs differ by up to ~1 % of their size. The weights stay fp32, and Adam
    moves each weight by about LR per update whatever the gradient's scale, so over 8 updates a
    gradient perturbation of ~1 % moves a weight by far less than one update (LR): atol=LR. rtol is
    torch's bf16 default (1.6e-2). A broken resume (lost optimiser moments, a wrong batch order or RNG
    state, a missed scheduler step) changes whole updates of every weight and fails this.
    OGM-GE's GE noise comes from its own checkpointed generator, so the resumed run draws the same noise.
    Bit-exactness is checked on CPU (tests/test_train.py, test_gaal.py, test_igm.py, test_cggm.py,
    test_ogm_ge.py, test_mla.py, test_mmpareto.py and test_argument_lists_are_valid_on_cpu above), where these kernels are deterministic."""
    a, b = whole_and_resumed(name, data, tmp_path, "cuda")
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(b[key], a[key], atol=LR, rtol=1.6e-2, msg=lambda m, k=key: f"{name} {k}: {m}")
        else:   # counters (BatchNorm num_batches_tracked): exact
            assert torch.equal(a[key], b[key]), key
    assert "bf16" in (run_dir(name, tmp_path / "whole") / "config.yaml").read_text()


# The same probe as tests/test_perf.py's CPU one (the benchmark's step of each method row), on CUDA:
# torch.cuda.set_sync_debug_mode("error") raises on any operation that waits for the device (.item(),
# a CUDA tensor used in a Python `if`, a non-pinned copy to the host, nonzero / masked_select shapes).
PROBE_ROWS = [("gaal", "imgtab", "gaal official"), ("gaal", "imgtab", "gaal paper"),
              ("igm", "av", "igm official"), ("igm", "av", "igm paper"),
              ("cggm", "seq3", "cggm official"), ("cggm", "seq3", "cggm paper"),
              ("ogm_ge", "av", "ogm_ge official"), ("ogm_ge", "av", "ogm_ge paper"),
              ("mla", "av", "mla official"), ("mla", "av", "mla paper"),
              ("mmpareto", "av", "mmpareto official"), ("mmpareto", "av", "mmpareto paper")]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("method, shape, row", PROBE_ROWS)
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_method_steps_never_synchronise_with_the_host_on_cuda(method, shape, row, precision):
    from benchmarks import step_time
    bench = step_time.BENCHES[method][0]
    step = bench(argparse.Namespace(shape=shape, steps=1, repeats=1), torch.device("cuda"), only=row)[row]["step"]

    def run():
        if precision == "bf16":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                step()
        else:
            step()
    run()   # warm-up: lazy initialisation, cuDNN / cuBLAS handles and algorithm selection may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
        run()   # the second step also covers state carried from the first (CGGM's direction term)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_fused_optimiser_is_picked_on_cuda():
    from train.optim import build_optimizer
    model = torch.nn.Linear(4, 2).cuda()
    cfg = dict(optimizer="adam", lr=LR, weight_decay=0.0, betas=[0.9, 0.999], momentum=0.9)
    opt = build_optimizer(cfg, model.parameters())
    assert opt.defaults.get("fused") is True
