"""`compile: none | encoders | step` (train/capture.py): the refusals, a compiled encoder that stays the
same module, and compiled training runs held to their eager run and to their own exact resume."""
import json

import pytest
import torch

from tests.test_train import final_weights, run_script, seq3_args, seq3_data  # noqa: F401  (fixture)
from train import capture
from train.config import ConfigError

CPU = torch.device("cpu")


class TwoEncoders(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoders = torch.nn.ModuleDict({"a": torch.nn.Linear(3, 4), "b": torch.nn.Linear(2, 4)})


def step(*_):
    return {}


def test_none_is_the_step_itself_and_the_refusals_are_one_line():
    model = TwoEncoders()
    kwargs = dict(method="m", compile_step=True, deepspeed=False)
    assert capture.apply_compile({"compile": "none"}, model, step, CPU, **kwargs) is step
    refusals = [
        (dict(kwargs, deepspeed=True), "encoders", "compile=encoders: not under DeepSpeed"),
        (dict(kwargs, compile_step="its step replaces the optimiser mid-run"), "step",
         "compile=step: m cannot be compiled as one step: its step replaces the optimiser mid-run; "
         "compile=encoders compiles its encoders alone"),
    ]
    for args, mode, message in refusals:
        with pytest.raises(ConfigError) as err:
            capture.apply_compile({"compile": mode}, model, step, CPU, **args)
        assert str(err.value).startswith(message) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"^compile=encoders: the model \(Linear\) has no encoders"):
        capture.apply_compile({"compile": "encoders"}, torch.nn.Linear(2, 2), step, CPU, **kwargs)


@pytest.mark.slow
def test_compiled_encoders_stay_the_same_modules_with_the_same_state_dict():
    torch.manual_seed(0)
    model = TwoEncoders()
    keys, x = list(model.state_dict()), torch.randn(5, 3)
    eager = model.encoders["a"](x)
    assert capture.compile_encoders(model) == 2
    assert list(model.state_dict()) == keys and isinstance(model.encoders["a"], torch.nn.Linear)
    torch.testing.assert_close(model.encoders["a"](x), eager)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["step", "encoders"])
def test_a_compiled_run_is_close_to_eager_and_resumes_exactly(mode, seq3_data, tmp_path):
    """2 epochs of 8 steps (Adam, lr 1e-3): compiled vs eager within 2 x steps x lr per weight (Adam
    moves a weight by about lr per step; compiled kernels reorder float operations, so the two runs
    drift apart by rounding only); `step`: a compiled run stopped at step 11 and resumed == the
    uninterrupted compiled run, bit for bit (`encoders` resumes through the same checkpoint code, its
    modules compiled in place: one compiled run there, to keep CI's time)."""
    eager, whole, split = tmp_path / "eager", tmp_path / "whole", tmp_path / "split"
    run_script("train/joint.py", seq3_args(seq3_data, eager))
    run_script("train/joint.py", seq3_args(seq3_data, whole, "--compile", mode))
    a, b = final_weights(eager), final_weights(whole)
    assert a.keys() == b.keys()   # compiled in place / the step compiled: no _orig_mod. prefixes in checkpoints
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(b[key], a[key], atol=2 * 16 * 1e-3, rtol=0, msg=key)
    assert json.loads((whole / "result.json").read_text())["test"]["fused"]["acc"] > 0.5
    if mode == "step":
        run_script("train/joint.py", seq3_args(seq3_data, split, "--compile", mode, "--stop_after_steps", "11"))
        run_script("train/joint.py", seq3_args(seq3_data, split, "--compile", mode, "--resume"))
        c = final_weights(split)
        for key in b:
            assert torch.equal(b[key], c[key]), key
