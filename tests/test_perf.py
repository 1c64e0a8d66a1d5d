"""The performance tooling: no host synchronisation in the methods' steps (checked on CPU by
intercepting every tensor -> host conversion made from our code), the memory probe, the scaling
arithmetic, and the benchmark entry point end to end on a small section."""
import argparse
import contextlib
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import scaling, step_time

REPO = Path(__file__).resolve().parent.parent
OUR_CODE = tuple(str(REPO / d) for d in ("methods", "models", "train"))
HOST_CONVERSIONS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
# conversions of tensors that live in host memory by design (no wait for the device): IGM draws the
# mixup lambda from the CPU generator (seeded alike on every rank, checkpointed), one per update
HOST_SIDE = {"igm official": ["Tensor.__float__ in train/igm.py:igm_step"] * 4,
             "igm paper": ["Tensor.__float__ in train/igm.py:igm_step"] * 4}


@contextlib.contextmanager
def host_conversions_from_our_code():
    """Record every Tensor -> host conversion whose caller is a file under methods/, models/ or train/
    (on a GPU each of these would block the step until the device catches up)."""
    calls, saved = [], {name: getattr(torch.Tensor, name) for name in HOST_CONVERSIONS}

    def wrap(name, original):
        def probe(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(OUR_CODE):
                calls.append(f"Tensor.{name} in {Path(caller.co_filename).relative_to(REPO)}:{caller.co_name}")
            return original(self, *args, **kwargs)
        return probe
    for name, original in saved.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        yield calls
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


def test_the_probe_sees_a_host_sync():
    def our_style_step():   # a conversion made by a file in train/ must be caught
        return torch.ones(2).sum().item()
    our_style_step.__code__ = our_style_step.__code__.replace(co_filename=str(REPO / "train" / "x.py"))
    with host_conversions_from_our_code() as calls:
        our_style_step()
    assert calls == ["Tensor.item in train/x.py:our_style_step"]


@pytest.mark.parametrize("method, shape, row", [
    ("gaal", "imgtab", "gaal official"), ("gaal", "imgtab", "gaal paper"),
    ("igm", "av", "igm official"), ("igm", "av", "igm paper"),
    ("cggm", "seq3", "cggm official"), ("cggm", "seq3", "cggm paper"),
    ("ogm_ge", "av", "ogm_ge official"), ("ogm_ge", "av", "ogm_ge paper"), ("mla", "av", "mla official"),
    ("mla", "av", "mla paper"), ("mmpareto", "av", "mmpareto official"), ("mmpareto", "av", "mmpareto paper"),
])
@pytest.mark.slow
def test_method_steps_never_synchronise_with_the_host(method, shape, row):
    torch.set_num_threads(1)
    bench = step_time.BENCHES[method][0]
    step = bench(argparse.Namespace(shape=shape, steps=1, repeats=1), torch.device("cpu"), only=row)[row]["step"]
    with host_conversions_from_our_code() as calls:
        step()
        step()   # the second step also covers state carried from the first (CGGM's direction term)
    assert calls == HOST_SIDE.get(row, [])


@pytest.mark.slow
@pytest.mark.integration   # perf starts step_time.py in a fresh process (not visible to the rule in conftest.py)
def test_row_memory_probe_counts_the_step():
    # in a fresh process, as perf.py runs it (in a process that already freed memory, malloc reuses
    # resident pages and the high-water mark need not move)
    from benchmarks import perf
    joint = perf.row_memory_in_fresh_process("cggm", "seq3", "joint", 2, torch.device("cpu"))
    assert joint > 2**20   # gradients, Adam state and activations of a ~0.6 M-parameter model: MiBs


def test_scaling_arithmetic():
    dvm = scaling.WORKLOADS["DVM, all 1.45 M images"][1]
    assert scaling.sample_bytes(dvm) == 3 * 128 * 128 + 17 * 4 + 16
    grads = scaling.gradient_bytes("igm")
    rows = [r for r in scaling.rows() if r[0].startswith("Kinetics")]
    assert [r[3] for r in rows] == [1, 8, 64]
    step = max(grads.values())
    assert rows[0][6] == "0.0 MB" and rows[1][6] == f"{2 * 7 / 8 * step / 1e6:.1f} MB"
    assert rows[2][4] == "1"   # the released batch of 64 leaves one sample per GPU at 64 GPUs


def test_perf_entry_point_prints_the_scaling_section(tmp_path, capsys):
    from benchmarks import perf
    perf.main(["--sections", "scaling", "--markdown", str(tmp_path / "perf.md")])
    out = capsys.readouterr().out
    assert "== scaling" in out and "Kinetics-Sounds" in out
    text = (tmp_path / "perf.md").read_text()
    assert text.startswith("Machine: ") and "| workload |" in text


@pytest.mark.parametrize("method", list(step_time.BENCHES))
def test_step_time_prints_every_row(method, capsys):
    """`benchmarks/step_time.py --method M` at the tiny shape, one chunk per row: its table has each
    row of the method's bench, in order, with a positive ms/step, the baseline first at ratio 1.000x."""
    step_time.main(["--method", method, "--shape", "tiny", "--steps", "1", "--repeats", "1"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("step ")) + 2   # past the header and dashes
    expected = step_time.BENCHES[method][2]
    rows = lines[first:first + len(expected)]
    assert [row.split("  ")[0] for row in rows] == list(expected)   # columns: two spaces apart
    cells = [row[len(name):].split() for row, name in zip(rows, expected)]   # ms/step, spread, samples/s, memory, ratio, floor
    assert all(float(c[0]) > 0 for c in cells) and cells[0][4] == "1.000x", rows
    assert method != "cggm" or "classifier parameters:" in out


@pytest.mark.slow
def test_profile_mode_reports_every_row(capsys):
    step_time.main(["--method", "cggm", "--profile", "--steps", "1"])
    lines = [line for line in capsys.readouterr().out.splitlines() if "self CPU time" in line]
    assert [line.split(":")[0] for line in lines] == ["joint", "joint + classifiers", "cggm official", "cggm paper"]
    assert all(float(line.split("time ")[1].split(" ms")[0]) > 0 for line in lines)


def test_round_orders_alternate_and_reverse():
    assert step_time.round_orders(["a", "b"], 4) == [["a", "b"], ["b", "a"], ["a", "b"], ["b", "a"]]
    assert step_time.round_orders(["a", "b", "c"], 3) == [["a", "b", "c"], ["c", "b", "a"], ["a", "b", "c"]]
    assert step_time.round_orders({"a": 1, "b": 2}, 1) == [["a", "b"]]


def test_percentile_and_summary():
    assert step_time.percentile([4, 1, 3, 2], 50) == 2.5
    assert step_time.percentile([10, 12, 14, 16, 18, 20], 25) == 12.5
    assert step_time.percentile([10, 12, 14, 16, 18, 20], 75) == 17.5
    assert step_time.percentile([7], 25) == step_time.percentile([7], 75) == 7
    assert step_time.summarise([0.3, 0.1, 0.2, 9.0]) == pytest.approx((0.25, 0.175, 2.475))


def test_time_runs_chunk_order_median_and_spread_with_a_fake_clock():
    """Fake steps advance a fake clock by a scripted time: the chunks must run warm-up first, then in
    alternation with the order reversed every round, the whole measurement twice, and the table must
    give each row's median per-step time over its chunks, the IQR as spread and the ratio of medians."""
    now, calls = [0.0], []
    base_ms = [10, 10, 10, 50, 10, 10]       # per chunk (ms/step): one chunk hit by other work
    method_ms = [10, 12, 14, 16, 18, 20]
    steps, rounds = 2, 3

    def fake_step(name, per_chunk_ms):
        def step():
            k = sum(c == name for c in calls)   # this row's call index; the first 2 are the warm-up
            calls.append(name)
            now[0] += 0.001 if k < 2 else per_chunk_ms[(k - 2) // steps] / 1e3
        return step
    runs = {"plain alternating": {"step": fake_step("plain alternating", base_ms), "times": [], "peak": 0},
            "method": {"step": fake_step("method", method_ms), "times": [], "peak": 0},
            "other": {"step": fake_step("other", [30] * 6), "times": [], "peak": 0}}
    floors = {"plain alternating": "1.000x", "method": "~1.5x", "other": "~3x"}
    rows = step_time.time_runs(runs, argparse.Namespace(steps=steps, repeats=rounds), torch.device("cpu"),
                               {"label": torch.zeros(100)}, floors, clock=lambda: now[0])

    chunks = [calls[i] for i in range(0, len(calls), 2)]   # every chunk (and the warm-up) is 2 calls of one row
    assert all(calls[i] == calls[i + 1] for i in range(0, len(calls), 2))
    A, B, C = "plain alternating", "method", "other"
    one_measurement = [A, B, C, C, B, A, A, B, C]
    assert chunks == [A, B, C] + one_measurement * step_time.REPETITIONS
    assert len(runs[A]["times"]) == rounds * step_time.REPETITIONS

    assert rows == [["plain alternating", "10.0", "10.0–10.0", "10000", "-", "1.000x", "1.000x"],
                    ["method", "15.0", "12.5–17.5", "6667", "-", "1.500x", "~1.5x"],
                    ["other", "30.0", "30.0–30.0", "3333", "-", "3.000x", "~3x"]]


def test_op_counter_counts_forward_backward_and_optimiser_step():
    """Linear-ReLU-Linear + cross-entropy + Adam: the forward's two addmm, autograd's backward (three
    mm: both weight gradients and the input gradient of the second layer) and Adam's update ops inside
    optimizer.step() must all be counted, once per step."""
    from benchmarks import ops
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.Adam(model.parameters())
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    counts = ops.count_ops(step)
    fwd_bwd, opt = counts["model"], counts["optimizer"]
    assert fwd_bwd["aten::addmm"] == 2 and fwd_bwd["aten::mm"] >= 3
    assert fwd_bwd["aten::nll_loss_backward"] == 1 and fwd_bwd["aten::threshold_backward"] == 1
    assert sum(n for op, n in opt.items() if "addcdiv" in op) >= 1          # Adam's update
    assert not any("backward" in op for op in opt)                          # phases kept apart
    assert ops.total(counts) == ops.aten_ops(fwd_bwd) + ops.aten_ops(opt) > 30
    assert ops.count_ops(step, warmup=0, steps=3) == counts                 # per step, deterministic


@pytest.mark.parametrize("method", list(step_time.BENCHES))
def test_operator_counts_stay_within_budget(method):
    """Each row's ATen operators per step at the tiny shape (CPU) at or below ops.OPS_BUDGET: the host
    overhead of a step cannot creep back up (lower the budget when a change cuts a count)."""
    from benchmarks import ops
    torch.set_num_threads(1)
    counts = {key: ops.total(c) for key, c in ops.count_all(methods=[method]).items()}
    assert len(counts) == len(step_time.BENCHES[method][2]) and set(counts) <= set(ops.OPS_BUDGET)
    over = {key: f"{n} > budget {ops.OPS_BUDGET[key]}" for key, n in counts.items() if n > ops.OPS_BUDGET[key]}
    assert not over, over


def test_perf_entry_point_prints_the_ops_section(tmp_path, capsys, monkeypatch):
    """`perf.py --sections ops` runs that section only and prints and writes its table (one method,
    one chunk per row here, to keep it short)."""
    from benchmarks import ops, perf
    monkeypatch.setattr(step_time, "BENCHES", {"mla": step_time.BENCHES["mla"]})
    monkeypatch.setattr(ops, "OPS_STEPS", 1)
    monkeypatch.setattr(ops, "OPS_REPEATS", 1)
    torch.set_num_threads(1)
    perf.main(["--sections", "ops", "--markdown", str(tmp_path / "perf.md")])
    out = capsys.readouterr().out
    assert "== host overhead" in out and "== steps" not in out and "== scaling" not in out
    table = [line.split() for line in out.splitlines() if line.startswith("mla ")]
    counts = {key: ops.total(c) for key, c in ops.count_all(methods=["mla"]).items()}
    assert [(" ".join(r[1:3]), int(r[3])) for r in table] == [
        ("plain alternating", counts["mla plain alternating"]), ("mla official", counts["mla official"]),
        ("mla paper", counts["mla paper"])]
    assert table[0][5] == "1.00x" and table[1][5] == f"{counts['mla official'] / counts['mla plain alternating']:.2f}x"
    lines = [line for line in out.splitlines() if line.startswith("mla ")]
    assert all(line.endswith(("yes", "no (ops)", "no (time)", "no (ops, time)")) for line in lines[1:])
    assert "<= 1.50x" in lines[1] and "<=" not in lines[0]   # the target is the methods', not the baseline's
    text = (tmp_path / "perf.md").read_text()
    assert "| method | step | ops/step |" in text and "| mla | mla paper |" in text and "<= 1.50×" in text
