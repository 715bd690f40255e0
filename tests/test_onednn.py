"""mtrl.onednn: oneDNN float32 products agree with torch's, under autograd and torch.func."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from mtrl import onednn
from mtrl.onednn import Linear, linear, mm_nt

pytestmark = pytest.mark.skipif(not onednn.enabled(), reason="no oneDNN in this torch build")

TOL = {"atol": 1e-4, "rtol": 1e-5}  # float32, different summation order


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _layer(gen, d_in=24, d_out=32, dtype=torch.float32):
    w = torch.randn(d_out, d_in, generator=gen, dtype=dtype).requires_grad_()
    b = torch.randn(d_out, generator=gen, dtype=dtype).requires_grad_()
    return w, b


@pytest.mark.parametrize("shape", [(40, 24), (3, 5, 24)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_forward_and_gradients_match_torch(gen, shape, with_bias):
    w, b = _layer(gen)
    b = b if with_bias else None
    x = torch.randn(*shape, generator=gen).requires_grad_()
    g_out = torch.randn(*shape[:-1], 32, generator=gen)
    ins = [x, w] + ([b] if with_bias else [])
    y = linear(x, w, b)
    ref = F.linear(x, w, b)
    torch.testing.assert_close(y, ref, **TOL)
    ours = torch.autograd.grad(y, ins, g_out)
    theirs = torch.autograd.grad(ref, ins, g_out)
    for a, c in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, c, **TOL)
    assert y.grad_fn is not None and "_Linear" in type(y.grad_fn).__name__


def test_only_the_inputs_that_need_gradients_get_them(gen):
    w, b = _layer(gen)
    x = torch.randn(10, 24, generator=gen)  # no grad
    (gw,) = torch.autograd.grad(linear(x, w.detach(), b).sum(), [b])
    torch.testing.assert_close(gw, torch.full((32,), 10.0))
    gx = torch.autograd.grad(linear(x.requires_grad_(), w.detach(), None).sum(), [x])[0]
    torch.testing.assert_close(gx, w.detach().sum(0).expand(10, 24), **TOL)


def _mlp_loss(params, x, y):
    h = torch.relu(linear(x, params["w1"], params["b1"]))
    return ((linear(h, params["w2"], params["b2"]).sum(-1) - y) ** 2).mean()


def _mlp_loss_torch(params, x, y):
    h = torch.relu(F.linear(x, params["w1"], params["b1"]))
    return ((F.linear(h, params["w2"], params["b2"]).sum(-1) - y) ** 2).mean()


def _mlp_params(gen):
    w1, b1 = _layer(gen, 24, 32)
    w2, b2 = _layer(gen, 32, 16)
    return {"w1": w1, "b1": b1, "w2": w2, "b2": b2}


@pytest.mark.parametrize("rows", [8, 70], ids=["bmm-blocks", "onednn-blocks"])
def test_per_block_gradients_under_vmap_of_grad_match_a_torch_loop(gen, rows, monkeypatch):
    """What mtrl.grad computes: one gradient per task block, shared weights (short blocks
    take one bmm for the weight gradients, long ones one oneDNN product per block; these
    layers are narrower than that path's minimum width, which is lowered here)."""
    monkeypatch.setattr(onednn, "_MIN_FEATURES_PER_BLOCK", 1)
    params = {k: v.detach() for k, v in _mlp_params(gen).items()}
    x = torch.randn(5, rows, 24, generator=gen)
    y = torch.randn(5, rows, generator=gen)
    per_block = vmap(grad(_mlp_loss), in_dims=(None, 0, 0))(params, x, y)
    for k in range(5):
        ref = grad(_mlp_loss_torch)(params, x[k], y[k])
        for name in params:
            assert per_block[name].shape == (5, *params[name].shape)
            torch.testing.assert_close(per_block[name][k], ref[name], **TOL)


def test_vmapped_forward_then_ordinary_backward(gen):
    """The loss-only path: per-task losses from a vmapped forward, one backward."""
    params = _mlp_params(gen)
    x = torch.randn(5, 8, 24, generator=gen)
    y = torch.randn(5, 8, generator=gen)
    losses = vmap(_mlp_loss, in_dims=(None, 0, 0))(params, x, y)
    ref_losses = vmap(_mlp_loss_torch, in_dims=(None, 0, 0))(params, x, y)
    torch.testing.assert_close(losses, ref_losses, **TOL)
    ours = torch.autograd.grad(losses.sum(), list(params.values()))
    theirs = torch.autograd.grad(ref_losses.sum(), list(params.values()))
    for a, c in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, c, **TOL)


def test_vmap_over_the_weights_falls_back_to_batched_products(gen):
    ws = torch.randn(3, 32, 24, generator=gen)
    bs = torch.randn(3, 32, generator=gen)
    x = torch.randn(7, 24, generator=gen)
    got = vmap(linear, in_dims=(None, 0, 0))(x, ws, bs)
    ref = torch.stack([F.linear(x, ws[i], bs[i]) for i in range(3)])
    torch.testing.assert_close(got, ref, **TOL)


def test_other_dtypes_and_small_layers_use_torch_exactly(gen):
    w64, b64 = _layer(gen, dtype=torch.float64)
    x64 = torch.randn(6, 24, generator=gen, dtype=torch.float64)
    assert torch.equal(linear(x64, w64, b64), F.linear(x64, w64, b64))
    w_small = torch.randn(onednn.MIN_OUT_FEATURES - 1, 24, generator=gen)
    x = torch.randn(6, 24, generator=gen)
    assert torch.equal(linear(x, w_small), F.linear(x, w_small))


def test_set_enabled_switches_back_to_torch(gen):
    w, b = _layer(gen)
    x = torch.randn(6, 24, generator=gen)
    try:
        assert onednn.set_enabled(False) is False and not onednn.enabled()
        assert torch.equal(linear(x, w, b), F.linear(x, w, b))
        assert torch.equal(mm_nt(x, x), x @ x.T)
    finally:
        assert onednn.set_enabled(True) is True
    assert onednn.enabled()


def test_double_backward_is_refused_with_a_clear_message(gen):
    w, b = _layer(gen)
    x = torch.randn(6, 24, generator=gen).requires_grad_()
    (gw,) = torch.autograd.grad(linear(x, w, b).pow(2).sum(), [w], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through mtrl.onednn.linear"):
        torch.autograd.grad(gw.sum(), [x])


def test_linear_module_is_a_drop_in_nn_linear(gen):
    torch.manual_seed(0)
    ours = Linear(24, 32)
    theirs = nn.Linear(24, 32)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(9, 24, generator=gen)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)
    params = {k: v.detach() for k, v in ours.named_parameters()}
    torch.testing.assert_close(functional_call(ours, params, (x,)), theirs(x), **TOL)


def test_mm_nt(gen):
    a = torch.randn(7, 300, generator=gen)
    b = torch.randn(5, 300, generator=gen)
    torch.testing.assert_close(mm_nt(a, b), a @ b.T, **TOL)
    # transposed and column-sliced operands (the latter are copied first)
    torch.testing.assert_close(mm_nt(a.T.contiguous().T, b), a @ b.T, **TOL)
    wide = torch.randn(7, 900, generator=gen)
    sliced = wide[:, 100:400]
    assert not sliced.is_contiguous() and not sliced.T.is_contiguous()
    torch.testing.assert_close(mm_nt(sliced, b), sliced @ b.T, **TOL)
    torch.testing.assert_close(mm_nt(b, sliced), b @ sliced.T, **TOL)
    a64 = a.double()
    assert torch.equal(mm_nt(a64, a64), a64 @ a64.T)
    with pytest.raises(ValueError, match="mm_nt takes 2-D tensors"):
        mm_nt(a[0], b)


@pytest.mark.parametrize("fn", ["mm_nt", "gram-panels", "gram-short"])
def test_products_that_autograd_records_get_their_gradients(gen, fn):
    """oneDNN's op has no autograd formula: mm_nt / gram of a tensor that requires grad
    returned an output that claimed a gradient, and backward gave the inputs none (found
    by an audit, 2026-11-29). Such products now go to torch; untracked ones stay oneDNN."""
    rows, cols = {"mm_nt": (5, 40), "gram-panels": (20, 1 << 14), "gram-short": (5, 40)}[fn]
    a = torch.randn(rows, cols, generator=gen, requires_grad=True)
    b = torch.randn(3, cols, generator=gen, requires_grad=True)
    if fn == "mm_nt":
        out, ref_inputs = mm_nt(a, b), (a, b)
        ref = lambda x, y: x @ y.T  # noqa: E731
    else:
        out, ref_inputs = onednn.gram(a), (a,)
        ref = lambda x: x @ x.T  # noqa: E731
    out.square().sum().backward()
    got = [t.grad.clone() for t in ref_inputs]
    for t in ref_inputs:
        t.grad = None
    ref(*ref_inputs).square().sum().backward()
    for g, t in zip(got, ref_inputs, strict=True):
        torch.testing.assert_close(g, t.grad, rtol=1e-4, atol=1e-3)
    calls = []
    real = onednn._OP
    try:
        onednn._OP = lambda *args: calls.append(1) or real(*args)
        with torch.no_grad():
            mm_nt(a, b)
        mm_nt(a.detach(), b.detach())
    finally:
        onednn._OP = real
    assert len(calls) == 2  # (no autograd to serve: oneDNN)


@pytest.mark.parametrize(
    ("k", "d", "layout"),
    [(50, 20_000, "rows"), (17, 1 << 14, "rows"), (33, 20_000, "columns"), (40, 1000, "rows"),
     (3, 20_000, "rows")],
    ids=["panels", "panels-2", "panels-from-columns", "short-rows", "few-rows"],
)
def test_gram_is_the_exact_symmetric_self_product(gen, k, d, layout):
    """``gram`` builds K > 16 Gramians of long rows from lower-triangle panels: every entry
    (both triangles, panel edges included) is a float32 product as accurate as one
    ``mm_nt``, and the result is exactly symmetric."""
    a = torch.randn(k, d, generator=gen) + 0.25
    if layout == "columns":
        a = a.T.contiguous().T
    got = onednn.gram(a)
    assert got.shape == (k, k) and got.dtype == torch.float32
    assert torch.equal(got, got.T)
    exact = a.double() @ a.double().T
    norms = exact.diagonal().sqrt()
    scale = torch.outer(norms, norms)
    err = ((got.double() - exact).abs() / scale).max().item()
    # a fixed float32 bound (it was 2x mm_nt's error, and for short rows mm_nt is the same
    # call as gram: a 0.1 % error passed). Measured over 3 seeds of these cases: 1.0-5.0
    # eps, torch's own float32 product 1.3-4.2 eps
    eps = torch.finfo(torch.float32).eps
    assert err <= 8 * eps, err / eps
    a64 = a.double()
    assert torch.equal(onednn.gram(a64), a64 @ a64.T)  # float64: torch's product


# ------------------------------------------------------------------------ fused MLP
def _mlps(seed=1, dims=(24, 64, 48, 3)):
    """mtrl's fused MLP and a plain nn.Sequential with the same parameters."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=False)):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    ref = nn.Sequential(*layers)
    ours = onednn.MLP(*[Linear(m.in_features, m.out_features) if isinstance(m, nn.Linear)
                        else nn.ReLU() for m in layers])  # fmt: skip
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    return ours, ref


@pytest.mark.parametrize("x_grad", [True, False])
def test_mlp_matches_sequential_under_autograd(gen, x_grad):
    ours, ref = _mlps()
    x = torch.randn(2, 9, 24, generator=gen).requires_grad_(x_grad)
    y = ours(x)
    assert y.grad_fn is not None and "_MLP" in type(y.grad_fn).__name__  # the fused path
    torch.testing.assert_close(y, ref(x), **TOL)
    g_out = torch.randn(2, 9, 3, generator=gen)
    ins = ([x] if x_grad else []) + list(ours.parameters())
    ref_ins = ([x] if x_grad else []) + list(ref.parameters())
    for a, c in zip(torch.autograd.grad(y, ins, g_out),
                    torch.autograd.grad(ref(x), ref_ins, g_out), strict=True):  # fmt: skip
        torch.testing.assert_close(a, c, **TOL)


def test_mlp_input_gradient_through_constant_weights(gen):
    """The actor loss differentiates through the critic, whose weights are constants."""
    ours, ref = _mlps()
    for p in [*ours.parameters(), *ref.parameters()]:
        p.requires_grad_(False)
    x = torch.randn(11, 24, generator=gen, requires_grad=True)
    (gx,) = torch.autograd.grad(ours(x).pow(2).sum(), [x])
    (gx_ref,) = torch.autograd.grad(ref(x).pow(2).sum(), [x])
    torch.testing.assert_close(gx, gx_ref, **TOL)


@pytest.mark.parametrize(
    ("rows", "dims"),
    [(8, (24, 64, 48, 3)), (70, (24, 64, 48, 3)), (8, (24, 3)), (70, (24, 40, 3))],
    ids=["bmm-blocks", "onednn-blocks", "one-layer", "two-layers"],
)
def test_mlp_per_block_gradients_match_a_torch_loop(gen, rows, dims, monkeypatch):
    monkeypatch.setattr(onednn, "_MIN_FEATURES_PER_BLOCK", 1)  # narrow layers, both paths
    ours, ref = _mlps(1, dims)
    params = {k: v.detach() for k, v in ours.named_parameters()}
    x = torch.randn(4, rows, 24, generator=gen)
    y = torch.randn(4, rows, 3, generator=gen)

    def loss(mod):
        return lambda p, x, y: ((functional_call(mod, p, (x,)) - y) ** 2).mean()

    per_block = vmap(grad(loss(ours)), in_dims=(None, 0, 0))(params, x, y)
    losses = vmap(loss(ours), in_dims=(None, 0, 0))(params, x, y)
    for k in range(4):
        ref_grads = grad(loss(ref))(params, x[k], y[k])
        torch.testing.assert_close(losses[k], loss(ref)(params, x[k], y[k]), **TOL)
        for name in params:
            torch.testing.assert_close(per_block[name][k], ref_grads[name], **TOL)


def test_mlp_per_block_gradients_through_a_constant_mlp(gen):
    """vmap(grad) of an actor-like loss: a trainable MLP feeding a constant one."""
    first, first_ref = _mlps(1, (24, 32, 16))
    critic, critic_ref = _mlps(2, (16, 40, 1))
    for p in [*critic.parameters(), *critic_ref.parameters()]:
        p.requires_grad_(False)
    params = {k: v.detach() for k, v in first.named_parameters()}
    x = torch.randn(3, 10, 24, generator=gen)

    def loss(a, c):
        return lambda p, x: c(torch.tanh(functional_call(a, p, (x,)))).mean()

    per_block = vmap(grad(loss(first, critic)), in_dims=(None, 0))(params, x)
    for k in range(3):
        ref_grads = grad(loss(first_ref, critic_ref))(params, x[k])
        for name in params:
            torch.testing.assert_close(per_block[name][k], ref_grads[name], **TOL)


def test_mlp_vmapped_over_its_parameters(gen):
    """An ensemble evaluated by vmap over stacked parameters (the fallback products)."""
    members = [_mlps(seed) for seed in (1, 2, 3)]
    names = [name for name, _ in members[0][0].named_parameters()]
    stacked = {
        name: torch.stack([dict(m.named_parameters())[name].detach() for m, _ in members])
        for name in names
    }
    x = torch.randn(7, 24, generator=gen)

    def run(p, x):
        return functional_call(members[0][0], p, (x,))

    out = vmap(run, in_dims=(0, None))(stacked, x)
    for i, (_, ref) in enumerate(members):
        torch.testing.assert_close(out[i], ref(x), **TOL)
    g = vmap(grad(lambda p, x: run(p, x).pow(2).sum()), in_dims=(0, None))(stacked, x)
    for i, (_, ref) in enumerate(members):
        ref_g = torch.autograd.grad(ref(x).pow(2).sum(), list(ref.parameters()))
        for (name, _), r in zip(ref.named_parameters(), ref_g, strict=True):
            torch.testing.assert_close(g[name][i], r, **TOL)


def test_mlp_runs_layer_by_layer_where_oneDNN_does_not_apply(gen):
    ours, ref = _mlps()
    x64 = torch.randn(5, 24, generator=gen, dtype=torch.float64)
    ours64, ref64 = ours.double(), ref.double()
    assert torch.equal(ours64(x64), ref64(x64))  # float64: torch's own products, exactly
    odd = onednn.MLP(Linear(24, 32), nn.Tanh(), Linear(32, 3))  # not Linear/ReLU: unfused
    y = odd(torch.randn(5, 24, generator=gen))
    assert "_MLP" not in type(y.grad_fn).__name__


def _is_fused(y: torch.Tensor) -> bool:
    return "_MLP" in type(y.grad_fn).__name__


@pytest.mark.parametrize("edit", ["append", "delete", "replace"])
def test_an_edited_mlp_computes_what_its_layers_say(gen, edit):
    """MLP decided once, at construction, that it was Linear/ReLU...: after an edit the
    fused path ignored an appended layer, kept a deleted ReLU, kept ReLU for Tanh."""
    ours, ref = _mlps()
    x = torch.randn(5, 24, generator=gen)
    if edit == "append":
        ours.append(nn.Linear(3, 2))
        ref.append(ours[-1])
    elif edit == "delete":
        del ours[-1], ref[-1]  # now ends with a ReLU
    else:
        ours[1], ref[1] = nn.Tanh(), nn.Tanh()
    y = ours(x)
    assert not _is_fused(y)
    torch.testing.assert_close(y, ref(x), **TOL)


def test_hooks_on_an_mlps_layers_run(gen):
    """The fused path never called the layers: their forward hooks did not run, and
    weight_norm's pre-hook did not recompute the weight (a stale weight was used)."""
    ours, ref = _mlps()
    x = torch.randn(5, 24, generator=gen)
    assert _is_fused(ours(x))
    calls = []
    handle = ours[0].register_forward_hook(lambda *args: calls.append(1))
    y = ours(x)
    assert calls == [1] and not _is_fused(y)
    torch.testing.assert_close(y, ref(x), **TOL)
    handle.remove()
    assert _is_fused(ours(x))  # no hooks left: fused again
    torch.nn.utils.parametrizations.weight_norm(ours[2])
    torch.nn.utils.parametrizations.weight_norm(ref[2])
    with torch.no_grad():
        ours[2].parametrizations.weight.original0.mul_(2)
        ref[2].parametrizations.weight.original0.mul_(2)
    torch.testing.assert_close(ours(x), ref(x), **TOL)
    glob = torch.nn.modules.module.register_module_forward_hook(lambda *a: calls.append(2))
    try:
        ours2, _ = _mlps()
        assert not _is_fused(ours2(x)) and 2 in calls
    finally:
        glob.remove()


def test_backward_hooks_on_an_mlps_layers_run(gen):
    """The fused backward never called the layers' backward hooks (nor global ones)."""
    ours, ref = _mlps()
    x = torch.randn(5, 24, generator=gen, requires_grad=True)
    calls = []
    handle = ours[0].register_full_backward_hook(lambda *args: calls.append(1))
    y = ours(x)
    assert not _is_fused(y)
    y.sum().backward()
    assert calls == [1]
    handle.remove()
    glob = torch.nn.modules.module.register_module_full_backward_hook(
        lambda *args: calls.append(2))
    try:
        ours(x).sum().backward()
        ref(x).sum().backward()
        assert calls.count(2) == 12  # each layer and the stack itself, in both modules
    finally:
        glob.remove()
    assert _is_fused(ours(x))


def test_subclassed_layers_in_an_mlp_compute_their_own_forward(gen):
    """Any nn.Linear subclass counted as fusable: one that scales its output (a LoRA- or
    quantised-style layer) was computed as a plain Linear."""

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2.0 * super().forward(x)

    class LeakyReLU(nn.ReLU):
        def forward(self, x):
            return torch.nn.functional.leaky_relu(x, 0.1)

    torch.manual_seed(0)
    for layers in ([Scaled(24, 64), nn.ReLU(), nn.Linear(64, 3)],
                   [nn.Linear(24, 64), LeakyReLU(), nn.Linear(64, 3)]):
        x = torch.randn(5, 24, generator=gen)
        y = onednn.MLP(*layers)(x)
        assert not _is_fused(y)
        torch.testing.assert_close(y, nn.Sequential(*layers)(x), **TOL)
    assert _is_fused(onednn.MLP(Linear(24, 64), nn.ReLU(), nn.Linear(64, 3))(x))


def test_mlp_double_backward_is_refused(gen):
    ours, _ = _mlps()
    x = torch.randn(6, 24, generator=gen, requires_grad=True)
    (gx,) = torch.autograd.grad(ours(x).pow(2).sum(), [x], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through mtrl.onednn.MLP"):
        torch.autograd.grad(gx.sum(), list(ours.parameters()))


def test_empty_operands_fall_back_to_torch(gen):
    """A batch of 0 rows (weight gradients over no rows) and a 0-wide product: torch's
    answer (zeros), where oneDNN cannot create its primitive."""
    net = onednn.MLP(Linear(5, 32), nn.ReLU(), Linear(32, 24))
    x = torch.randn(0, 5, generator=gen, requires_grad=True)
    y = net(x)
    assert y.shape == (0, 24)
    y.sum().backward()
    for p in net.parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))
    assert torch.equal(mm_nt(torch.randn(4, 0), torch.randn(3, 0)), torch.zeros(4, 3))
    lin = Linear(5, 32)
    lin(torch.randn(0, 5)).sum().backward()
    assert torch.equal(lin.weight.grad, torch.zeros(32, 5))


def test_a_strided_bias_and_a_toggle_between_forward_and_backward(gen):
    """oneDNN reads the bias as contiguous: a strided (or expanded) one must be copied;
    and a backward after set_enabled(False) still runs (torch's products)."""
    x = torch.randn(6, 8, generator=gen)
    w = torch.randn(16, 8, generator=gen)
    for b in (torch.randn(32, generator=gen)[::2], torch.tensor(0.5).expand(16)):
        torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), **TOL)
    w.requires_grad_()
    was = onednn.enabled()
    try:
        y = linear(x, w)
        onednn.set_enabled(False)
        y.sum().backward()
    finally:
        onednn.set_enabled(was)
    torch.testing.assert_close(w.grad, torch.ones(6, 16).T @ x, **TOL)


@pytest.mark.parametrize(("setting", "on", "warned"), [
    ("0", False, False), ("off", False, False), ("1", True, False), ("maybe", True, True)])
def test_mtrl_onednn_settings(monkeypatch, setting, on, warned):
    """MTRL_ONEDNN=maybe was silently taken as "on"."""
    import warnings

    monkeypatch.setenv("MTRL_ONEDNN", setting)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        op = onednn._find_op()
    assert (op is not None) == (on and onednn._AVAILABLE is not None)
    messages = [str(w.message) for w in caught]
    assert any("MTRL_ONEDNN='maybe' is not understood; oneDNN stays on" in m
               for m in messages) == warned, messages


def test_the_cli_reports_a_bad_mtrl_onednn_as_a_warning_line():
    """The warning comes at import; the `mtrl` command imported that module before it took
    over warnings, so it printed Python's raw form (file, line and source excerpt)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MTRL_ONEDNN": "foo"}
    proc = subprocess.run([sys.executable, "-m", "mtrl.cli", "balancers"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        "warning: MTRL_ONEDNN='foo' is not understood; oneDNN stays on (MTRL_ONEDNN=0 turns "
        "it off)"]


@pytest.mark.parametrize("setting", ["false", "no", "OFF", " Off "])
def test_every_documented_word_for_off_turns_onednn_off(monkeypatch, setting):
    """The README lists 0, false, no and off (any case) as the ways to turn oneDNN off."""
    import warnings

    monkeypatch.setenv("MTRL_ONEDNN", setting)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not understood" warning either
        assert onednn._find_op() is None


def test_mlp_with_frozen_weights_and_trainable_biases(gen):
    """Only the biases need gradients: the fused backward must still return theirs."""
    ours, ref = _mlps()
    for mlp in (ours, ref):
        for name, p in mlp.named_parameters():
            p.requires_grad_(name.endswith("bias"))
    x = torch.randn(9, 24, generator=gen)
    y = ours(x)
    assert "_MLP" in type(y.grad_fn).__name__
    biases = [p for n, p in ours.named_parameters() if n.endswith("bias")]
    ref_biases = [p for n, p in ref.named_parameters() if n.endswith("bias")]
    got = torch.autograd.grad(y.square().sum(), biases)
    want = torch.autograd.grad(ref(x).square().sum(), ref_biases)
    for a, c in zip(got, want, strict=True):
        torch.testing.assert_close(a, c, **TOL)


def test_vmap_over_a_batch_dimension_that_is_not_the_first(gen):
    w, b = _layer(gen)
    x = torch.randn(7, 5, 24, generator=gen)
    got = vmap(lambda xi: linear(xi, w, b), in_dims=1)(x)
    assert got.shape == (5, 7, 32)
    torch.testing.assert_close(got, F.linear(x, w, b).movedim(1, 0), **TOL)
    ours, ref = _mlps()
    got = vmap(ours, in_dims=1)(x)
    assert got.shape == (5, 7, 3)
    torch.testing.assert_close(got, ref(x).movedim(1, 0), **TOL)


def test_layers_without_bias_under_block_gradients_run_as_usual(gen):
    """Bias-less layers do not qualify for the per-block path; they run unrecorded."""
    lin = Linear(24, 200, bias=False)
    mlp = onednn.MLP(Linear(24, 200, bias=False), nn.ReLU(), Linear(200, 3))
    x = torch.randn(40, 24, generator=gen)
    for layer in (lin, mlp):
        with onednn.block_gradients(4, 40) as probes:
            y = layer(x)
        ref = F.linear(x, lin.weight) if layer is lin else mlp[2](torch.relu(mlp[0](x)))
        torch.testing.assert_close(y, ref, **TOL)
        # the MLP is not fusable and runs layer by layer: only its biased layer records
        want = [] if layer is lin else [mlp[2].weight, mlp[2].bias]
        assert [id(p) for p, _ in probes] == [id(p) for p in want]
