"""Tests for methods/ (GAAL surgery, CGGM modulation, IGM flat projection + SAM). CPU, fast."""

import math

import pytest
import torch
import torch.nn.functional as F

from methods.flat_sam import (
    accumulate_input_moment,
    accumulate_input_moment_from_sum,
    flat_projection,
    input_sum_and_count,
    mix_inputs,
    mixup_cross_entropy,
    project_weight_grad,
    sam_perturbation_global,
    sam_perturbation_per_tensor,
)
from methods.modulation import (
    balance_coefficients,
    balance_coefficients_tensor,
    balance_degenerate,
    balance_degenerate_tensor,
    clip_coefficients,
    direction_loss,
)
from methods.surgery import (
    entropy,
    flatten_head_grad,
    global_hard_sample_indices,
    global_hard_sample_mask,
    hard_sample_count,
    hard_sample_indices,
    project_conflicting,
    project_conflicting_with_stats,
    unflatten_head_grad,
)

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
# GAAL: entropy, hard samples, surgery


def test_entropy_matches_hand_computation():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0 - 1000.0]],
                          dtype=torch.float64)
    # p = (1/2, 1/2): log 2; p = (3/4, 1/4): -(3/4 log 3/4 + 1/4 log 1/4); p ≈ (1, 0): 0
    expected = torch.tensor([math.log(2.0),
                             -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)),
                             0.0], dtype=torch.float64)
    got = entropy(logits)
    assert got.shape == (3,)
    assert torch.allclose(got, expected, atol=1e-12)
    assert torch.isfinite(entropy(torch.tensor([[1e4, -1e4, 0.0]]))).all()
    # uniform over C classes: log C; half precision is computed in float32
    assert torch.allclose(entropy(torch.zeros(4, 7, dtype=torch.float16)),
                          torch.full((4,), math.log(7.0)), atol=1e-6)


@pytest.mark.parametrize("batch, frac", [(10, 0.5), (7, 0.5), (1, 0.5), (3, 0.2), (256, 0.5),
                                         (5, 1.0)])
def test_hard_sample_indices_picks_highest_entropy(batch, frac):
    g = torch.Generator().manual_seed(batch)
    logits = torch.randn(batch, 5, generator=g) * 3
    idx = hard_sample_indices(logits, frac)
    k = max(1, math.floor(frac * batch))
    assert idx.dtype == torch.long and idx.shape == (k,)
    assert k == hard_sample_count(batch, frac)
    ent = entropy(logits)
    assert set(idx.tolist()) == set(torch.topk(ent, k).indices.tolist())
    chosen = ent[idx]
    rest = ent[[i for i in range(batch) if i not in set(idx.tolist())]]
    if rest.numel():
        assert chosen.min() >= rest.max()


def test_hard_sample_count_rejects_bad_frac():
    for frac in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            hard_sample_count(10, frac)


def test_global_selection_matches_single_rank():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(13, 4, generator=g)
    logits[5] = logits[2]  # a tie: stable order picks the lower index on every layout
    ent = entropy(logits)
    full = set(hard_sample_indices(logits, 0.5).tolist())
    sizes = [6, 7]  # unequal ranks
    picked = set()
    offset = 0
    for n in sizes:
        mask, k = global_hard_sample_mask(ent, 0.5, offset, n)
        assert k == 6 and mask.dtype == torch.bool and mask.shape == (n,)
        local, k2 = global_hard_sample_indices(ent, 0.5, offset, n)
        assert k2 == k and torch.equal(local, mask.nonzero(as_tuple=True)[0])
        picked |= {offset + i for i in local.tolist()}
        offset += n
    assert picked == full


def _golden_min(f, lo, hi, iters=200):
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - inv_phi * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + inv_phi * (b - a)
            fd = f(d)
    return 0.5 * (a + b)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("margin, eps", [(0.75, 1e-3), (0.0, 1e-3), (0.1, 0.5)])
def test_project_conflicting_solves_the_dual_qp(seed, margin, eps):
    g_gen = torch.Generator().manual_seed(seed)
    g = torch.randn(50, generator=g_gen, dtype=torch.float64)
    g_ref = torch.randn(50, generator=g_gen, dtype=torch.float64) * (0.05 + seed)
    if torch.dot(g, g_ref) >= 0:  # make them conflict
        g_ref = -g_ref
    dot = torch.dot(g, g_ref).item()
    rr = torch.dot(g_ref, g_ref).item()

    def dual(v):  # GEM dual, one constraint, ridge eps
        return 0.5 * v * v * (rr + eps) + v * dot

    # brute force over v >= margin: the unconstrained minimum lies at -dot/(rr+eps) > 0
    v_star = _golden_min(dual, margin, margin + 10.0 * (abs(dot) / (rr + eps) + 1.0))
    # the grid confirms golden search did not stop in a wrong bracket
    grid = torch.linspace(margin, margin + 5.0 * (abs(dot) / (rr + eps) + 1.0), 20001,
                          dtype=torch.float64)
    v_grid = grid[torch.argmin(0.5 * grid ** 2 * (rr + eps) + grid * dot)].item()
    assert abs(v_star - v_grid) <= (grid[1] - grid[0]).item()

    expected = g + v_star * g_ref
    got = project_conflicting(g, g_ref, margin=margin, eps=eps)
    assert got.dtype == g.dtype
    assert torch.allclose(got, expected, rtol=0, atol=1e-7 * (1 + expected.abs().max().item()))
    stats = project_conflicting_with_stats(g, g_ref, margin=margin, eps=eps)
    assert stats.conflict.item()
    assert abs(stats.v.item() - max(margin, -dot / (rr + eps))) < 1e-12
    assert stats.cos_before.item() < 0
    assert stats.cos_after.item() > stats.cos_before.item()


def test_project_conflicting_leaves_agreeing_gradients_untouched():
    g_gen = torch.Generator().manual_seed(1)
    g = torch.randn(1000, generator=g_gen)
    g_ref = g + 0.1 * torch.randn(1000, generator=g_gen)
    assert torch.dot(g, g_ref) > 0
    out = project_conflicting(g, g_ref)
    assert torch.equal(out, g)
    stats = project_conflicting_with_stats(g, g_ref)
    assert not stats.conflict.item() and stats.v.item() == 0.0
    assert stats.cos_after.item() == stats.cos_before.item()
    # orthogonal: the strict test says no conflict
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.equal(project_conflicting(e0, e1), e0)
    # zero reference
    assert torch.equal(project_conflicting(g, torch.zeros_like(g)), g)


def test_project_conflicting_float32_in_float64_out_float32():
    g_gen = torch.Generator().manual_seed(2)
    g = torch.randn(300, generator=g_gen)
    g_ref = -g + 0.5 * torch.randn(300, generator=g_gen)
    out = project_conflicting(g, g_ref)
    g64, r64 = g.double(), g_ref.double()
    v = max(0.75, -(g64 @ r64).item() / ((r64 @ r64).item() + 1e-3))
    assert out.dtype == torch.float32
    assert torch.equal(out, (g64 + v * r64).float())


def test_margin_zero_gives_near_orthogonal_result():
    g_gen = torch.Generator().manual_seed(3)
    g = torch.randn(200, generator=g_gen, dtype=torch.float64)
    g_ref = -g + 0.3 * torch.randn(200, generator=g_gen, dtype=torch.float64)
    out = project_conflicting(g, g_ref, margin=0.0, eps=1e-6)
    cos = torch.dot(out, g_ref) / (out.norm() * g_ref.norm())
    assert abs(cos.item()) < 1e-3
    # a large reference (unconstrained v < margin): the default margin over-corrects and the
    # result points with g_ref
    big_ref = 10.0 * g_ref
    assert -torch.dot(g, big_ref) / torch.dot(big_ref, big_ref) < 0.75
    assert torch.dot(project_conflicting(g, big_ref), big_ref) > 0


def test_flatten_unflatten_head_grad_layout():
    w = torch.arange(6.0).view(2, 3)
    b = torch.tensor([10.0, 11.0])
    flat = flatten_head_grad(w, b)
    assert flat.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 11.0]
    w2, b2 = unflatten_head_grad(flat, w.shape)
    assert torch.equal(w2, w) and torch.equal(b2, b)
    w3, b3 = unflatten_head_grad(flatten_head_grad(w), w.shape, has_bias=False)
    assert torch.equal(w3, w) and b3 is None
    with pytest.raises(ValueError):
        unflatten_head_grad(flat[:-1], w.shape)


# --------------------------------------------------------------------------------------------
# CGGM: balance coefficients, direction loss


def test_balance_coefficients_hand_and_sum():
    now, prev = [0.5, 0.75, 0.25], [0.25, 0.5, 0.5]
    d = [0.25, 0.25, -0.25]
    s = sum(d) + 1e-8
    expected = [(s - x) / s for x in d]
    got = balance_coefficients(now, prev)
    assert isinstance(got, list) and all(isinstance(c, float) for c in got)
    assert got == pytest.approx(expected, rel=1e-12)
    # Σc = M − Σd/S = M − 1 + eps/S
    assert sum(got) == pytest.approx(len(got) - 1 + 1e-8 / s, abs=1e-12)
    tens = balance_coefficients_tensor(torch.tensor(now), torch.tensor(prev))
    assert tens.dtype == torch.float64
    assert torch.allclose(tens, torch.tensor(expected, dtype=torch.float64), rtol=1e-12)
    # sequences of 0-d tensors work too
    tens2 = balance_coefficients_tensor([torch.tensor(x) for x in now],
                                        [torch.tensor(x) for x in prev])
    assert torch.equal(tens, tens2)
    assert not balance_degenerate(now, prev)
    assert not balance_degenerate_tensor(torch.tensor(now), torch.tensor(prev)).item()
    # first step: prev = 0
    first = balance_coefficients([0.5, 0.25], [0.0, 0.0])
    assert first == pytest.approx([(0.75 - 0.5) / 0.75, (0.75 - 0.25) / 0.75], rel=1e-7)


def test_balance_coefficients_zero_sum_is_reported_and_clipped():
    # batch accuracies k/B with Σd = 0 exactly: the released formula's known defect (docs/methods/cggm.md)
    now, prev = [40 / 64, 30 / 64, 20 / 64], [38 / 64, 31 / 64, 21 / 64]
    d = [a - b for a, b in zip(now, prev)]
    assert sum(d) == 0.0
    c = balance_coefficients(now, prev)
    assert max(abs(x) for x in c) > 1e5
    assert min(c) < 0  # negative multiplier: gradient ascent on an encoder
    assert balance_degenerate(now, prev)
    assert balance_degenerate_tensor(torch.tensor(now, dtype=torch.float64),
                                     torch.tensor(prev, dtype=torch.float64)).item()
    ct = balance_coefficients_tensor(torch.tensor(now, dtype=torch.float64),
                                     torch.tensor(prev, dtype=torch.float64))
    assert torch.allclose(ct, torch.tensor(c, dtype=torch.float64), rtol=1e-9)
    clipped = clip_coefficients(c, 0.0, 2.0)
    assert all(0.0 <= x <= 2.0 for x in clipped)
    assert clipped == [min(max(x, 0.0), 2.0) for x in c]
    clipped_t = clip_coefficients(ct, 0.0, 2.0)
    assert torch.equal(clipped_t, torch.tensor(clipped, dtype=torch.float64))
    with pytest.raises(ValueError):
        clip_coefficients(c, 1.0, 0.0)


def test_direction_loss_matches_hand_computation():
    g_gen = torch.Generator().manual_seed(4)
    fused = torch.randn(3, 8, generator=g_gen, dtype=torch.float64, requires_grad=True)
    vecs = [torch.randn(3, 8, generator=g_gen, dtype=torch.float64) for _ in range(3)]
    coeffs = [1.2, -0.4, 0.2]
    loss = direction_loss(coeffs, fused, vecs)
    f = fused.detach().reshape(-1)
    cos = [(v.reshape(-1) @ f / (v.norm() * f.norm())).item() for v in vecs]
    expected = (sum(abs(c) for c in coeffs) - sum(c * x for c, x in zip(coeffs, cos))) / 3
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert direction_loss(torch.tensor(coeffs, dtype=torch.float64), fused, vecs).item() == pytest.approx(expected,
                                                                                      rel=1e-12)
    loss.backward()
    assert fused.grad is not None and torch.isfinite(fused.grad).all()
    # aligned vectors with positive coefficients: zero loss
    same = direction_loss([0.5, 1.5], f, [2 * f, 3 * f])
    assert abs(same.item()) < 1e-12
    with pytest.raises(ValueError):
        direction_loss([1.0, 1.0], f, [f])


# --------------------------------------------------------------------------------------------
# IGM: flat projection, SAM, mixup


def _random_psd(d, rank, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rank, d, generator=g, dtype=torch.float64)
    return a.T @ a


@pytest.mark.parametrize("d, rank", [(6, 6), (8, 3), (5, 1)])
@pytest.mark.parametrize("tau", [0.4, 2.0])
def test_flat_projection_properties(d, rank, tau):
    Y = _random_psd(d, rank, seed=d + rank)
    T = flat_projection(Y, tau)
    assert T.shape == (d, d) and T.dtype == Y.dtype
    assert torch.equal(T, T.T)
    ev = torch.linalg.eigvalsh(T)
    assert ev.min().item() >= math.exp(-tau) - 1e-10
    assert ev.max().item() <= 1.0 + 1e-10
    lam, vecs = torch.linalg.eigh(Y)
    flattest, sharpest = vecs[:, 0], vecs[:, -1]
    assert torch.allclose(T @ flattest, flattest, atol=1e-10)
    assert torch.allclose(T @ sharpest, math.exp(-tau) * sharpest, atol=1e-10)
    # float32 in, float32 out
    T32 = flat_projection(Y.float(), tau)
    assert T32.dtype == torch.float32 and torch.equal(T32, T32.T)


@pytest.mark.parametrize("Y", [3.0 * torch.eye(5), torch.zeros(4, 4), 2.5 * torch.eye(3,
                                                                                     dtype=torch.float64)])
def test_flat_projection_degenerate_spectrum_is_identity(Y):
    T = flat_projection(Y, 0.4)
    assert not torch.isnan(T).any()
    assert torch.equal(T, torch.eye(Y.shape[0], dtype=Y.dtype))


def test_project_weight_grad_matches_paper_layout():
    g = torch.Generator().manual_seed(5)
    grad = torch.randn(4, 6, generator=g, dtype=torch.float64)
    T = flat_projection(_random_psd(6, 2, seed=9), 0.4)
    out = project_weight_grad(grad, T)
    assert out.shape == grad.shape
    assert torch.allclose(out, (T @ grad.T).T, atol=1e-12)
    with pytest.raises(ValueError):
        project_weight_grad(grad, torch.eye(4, dtype=torch.float64))


def test_accumulate_input_moment_uncentred_and_ddp_form():
    g = torch.Generator().manual_seed(6)
    batches = [torch.randn(5, 3, generator=g) for _ in range(3)]
    Y = None
    for a in batches:
        Y = accumulate_input_moment(Y, a)
    expected = sum(torch.outer(a.double().mean(0), a.double().mean(0)) for a in batches)
    assert Y.dtype == torch.float64
    assert torch.allclose(Y, expected, atol=1e-6)
    # DDP: per-rank sums, all-reduced, give the moment of the global batch mean
    a = batches[0]
    (s0, n0), (s1, n1) = input_sum_and_count(a[:2]), input_sum_and_count(a[2:])
    Y_ddp = accumulate_input_moment_from_sum(None, s0 + s1, n0 + n1)
    assert torch.allclose(Y_ddp, accumulate_input_moment(None, a), atol=1e-6)
    # in a given dtype, and with leading sequence dims
    Y32 = accumulate_input_moment(torch.zeros(3, 3), torch.ones(2, 4, 3))
    assert Y32.dtype == torch.float32 and torch.equal(Y32, torch.ones(3, 3))


def test_sam_perturbation_norms():
    g = torch.Generator().manual_seed(7)
    grads = [torch.randn(4, 3, generator=g), None, torch.randn(5, generator=g) * 100,
             torch.zeros(2)]
    rho = 0.05
    per = sam_perturbation_per_tensor(grads, rho)
    assert per[1] is None
    for gi, ei in zip(grads, per):
        if gi is None:
            continue
        if gi.abs().sum() == 0:
            assert torch.equal(ei, torch.zeros_like(gi))
        else:
            assert ei.norm().item() == pytest.approx(rho, rel=1e-5)
            assert torch.allclose(ei / ei.norm(), gi / gi.norm(), atol=1e-6)
    glob = sam_perturbation_global(grads, rho)
    assert glob[1] is None
    present = [e for e in glob if e is not None]
    total = torch.sqrt(sum((e.double() ** 2).sum() for e in present))
    assert total.item() == pytest.approx(rho, rel=1e-5)
    gnorm = torch.sqrt(sum((x.double() ** 2).sum() for x in grads if x is not None))
    for gi, ei in zip(grads, glob):
        if gi is not None:
            assert torch.allclose(ei.double(), rho * gi.double() / gnorm, atol=1e-7)
    assert sam_perturbation_global([None, None], rho) == [None, None]


def test_mixup_cross_entropy_and_inputs_match_hand_computation():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]],
                          dtype=torch.float64)
    labels = torch.tensor([0, 2, 1])
    perm = torch.tensor([2, 0, 1])
    lam = 0.3
    log_p = torch.log_softmax(logits, dim=1)
    expected = torch.tensor([-(lam * log_p[i, labels[i]] + (1 - lam) * log_p[i, labels[perm[i]]])
                             for i in range(3)], dtype=torch.float64)
    got = mixup_cross_entropy(logits, labels, perm, lam)
    assert got.shape == (3,)
    assert torch.allclose(got, expected, atol=1e-12)
    # official step loss identity: 0.7·L_ori + 0.3·CE(o,y) = (0.3+0.7λ)CE(o,y) + 0.7(1−λ)CE(o,y[perm])
    ce = F.cross_entropy(logits, labels, reduction="none")
    ce_p = F.cross_entropy(logits, labels[perm], reduction="none")
    assert torch.allclose(0.7 * got + 0.3 * ce, (0.3 + 0.7 * lam) * ce + 0.7 * (1 - lam) * ce_p,
                          atol=1e-12)
    x = torch.arange(6.0).view(3, 2)
    assert torch.allclose(mix_inputs(x, lam, perm), lam * x + (1 - lam) * x[perm])


def test_projection_diagnostics_by_hand():
    """Y with energy in 2 of 4 directions (eigenvalues 3, 1, 0, 0): effective rank exp(H(3/4, 1/4)),
    top share 3/4, T's eigenvalues exp(-tau * lam/3): damped by more than half of e^-tau only the
    top direction; mean scale their mean. Y = 0 gives T = I."""
    import math
    from methods import flat_sam
    tau = 0.4
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    Y = q @ torch.diag(torch.tensor([3.0, 1.0, 0.0, 0.0], dtype=torch.float64)) @ q.T
    d = flat_sam.projection_diagnostics(Y, tau)
    assert float(d["effective_rank"]) == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    assert float(d["top_energy_share"]) == pytest.approx(0.75)
    sigma = [math.exp(-tau * lam / 3) for lam in (3, 1, 0, 0)]
    assert float(d["damped_share"]) == pytest.approx(sum(s < (1 + math.exp(-tau)) / 2 for s in sigma) / 4) == 0.25
    assert float(d["mean_scale"]) == pytest.approx(sum(sigma) / 4)
    eig_t = torch.linalg.eigvalsh(flat_sam.flat_projection(Y, tau))
    assert float(d["mean_scale"]) == pytest.approx(float(eig_t.mean()))
    zero = flat_sam.projection_diagnostics(torch.zeros(3, 3), tau)
    assert float(zero["damped_share"]) == 0 and float(zero["mean_scale"]) == 1 and float(zero["effective_rank"]) == 1
