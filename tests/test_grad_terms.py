"""``balanced_backward_terms`` and ``mtrl.onednn.block_gradients``: per-task gradients from
one ordinary forward/backward, checked against the ``vmap`` path of ``balanced_backward``
(and that path's fallbacks when the fast path does not apply)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

import mtrl.grad as grad_mod
from mtrl import onednn
from mtrl.agents.networks import SquashedGaussianActor, TwinCritic, mlp
from mtrl.balancers import build
from mtrl.grad import balanced_backward, balanced_backward_terms, mean_of_terms

pytestmark = pytest.mark.skipif(not onednn.enabled(), reason="no oneDNN in this torch build")

K, N_PER, OBS, ACT = 4, 6, 9, 3
N = K * N_PER


def data(dtype=torch.float32, seed=0) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(N, OBS, generator=g)
    act = torch.rand(N, ACT, generator=g) * 2 - 1
    y = torch.randn(N, generator=g)
    task = torch.arange(K).repeat_interleave(N_PER)
    return obs.to(dtype), act.to(dtype), y.to(dtype), task


def critic_case(heads: int = 1, dtype=torch.float32):
    torch.manual_seed(1)
    critic = TwinCritic(OBS, ACT, (32, 32), num_heads=heads).to(dtype)

    def terms(params, obs, act, y, task):
        q = functional_call(critic, params, (obs, act, task))
        return ((q - y) ** 2).sum(0)

    return critic, terms


def actor_case():
    torch.manual_seed(2)
    actor = SquashedGaussianActor(OBS, ACT, (32, 32))
    critic = TwinCritic(OBS, ACT, (32, 32))
    consts = {k: v.detach() for k, v in critic.named_parameters()}

    def terms(params, obs, eps, y, task):  # the data's actions serve as the noise
        a, log_prob, _ = functional_call(actor, params, (obs, None, eps))
        q = functional_call(critic, consts, (obs, a)).min(0).values
        return 0.1 * log_prob - q + 0 * y

    return actor, terms


def run(path: str, module: nn.Module, terms, balancer, rows: tuple[Tensor, ...], **kwargs):
    params = dict(module.named_parameters())
    for p in params.values():
        p.grad = None
    if path == "terms":
        stats = balanced_backward_terms(terms, params, rows, K, balancer, **kwargs)
    else:
        blocks = [t.reshape(K, N_PER, *t.shape[1:]) for t in rows]
        stats = balanced_backward(mean_of_terms(terms), params, blocks, balancer)
    return stats, {n: p.grad.clone() for n, p in params.items()}


def assert_same_result(a, b, rtol=1e-6) -> None:
    (sa, ga), (sb, gb) = a, b
    assert ga.keys() == gb.keys()
    for name in ga:  # float32 rounding is relative to the tensor's scale, not each entry's
        scale = float(gb[name].abs().max())
        torch.testing.assert_close(ga[name], gb[name], rtol=rtol, atol=rtol * scale, msg=name)
    for field in sa._fields:
        torch.testing.assert_close(getattr(sa, field), getattr(sb, field), rtol=1e-5,
                                   atol=1e-6, equal_nan=True, msg=field)  # fmt: skip


@pytest.fixture
def no_vmap(monkeypatch):
    """Fail if the ``vmap`` path computes per-task gradients."""

    def fail(*args, **kwargs):
        raise AssertionError("the vmap path ran")

    monkeypatch.setattr(grad_mod, "_task_gradient_pieces", fail)


@pytest.fixture
def vmap_calls(monkeypatch):
    calls = []
    real = grad_mod._task_gradient_pieces

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(grad_mod, "_task_gradient_pieces", spy)
    return calls


class RowsPCGrad(type(build("pcgrad"))):
    """PCGrad through its own ``combine_rows``: the plumbing must hand it the (K, D) rows."""

    name = "test-rows-pcgrad"

    def combine_rows(self, grads, losses=None):
        assert grads.ndim == 2 and grads.shape[1] > 1000  # the concatenated rows
        return self.weights_for(grads, losses).to(grads) @ grads


BALANCERS = {
    "cagrad": lambda: build("cagrad"),  # Gramian weights, direction written per block
    "pcgrad": lambda: build("pcgrad", seed=3),  # Gramian weights too
    "rows": lambda: RowsPCGrad(seed=3),  # its own combine_rows: the (K, D) matrix
    "sdmgrad-os": lambda: build("sdmgrad-os", num_sampled=2, seed=4),  # sampled rows only
    "mean": lambda: build("mean"),  # loss only
}


@pytest.mark.parametrize("case", ["critic", "critic-multihead", "actor"])
@pytest.mark.parametrize("name", list(BALANCERS))
def test_terms_path_equals_the_vmap_path(case, name):
    module, terms = {"critic": critic_case, "critic-multihead": lambda: critic_case(heads=K),
                     "actor": actor_case}[case]()  # fmt: skip
    rows = data()
    fast = run("terms", module, terms, BALANCERS[name](), rows)
    ref = run("vmap", module, terms, BALANCERS[name](), rows)
    assert_same_result(fast, ref)
    if name == "sdmgrad-os":  # all K losses reported, two rows of weights non-zero
        assert torch.isfinite(fast[0].losses).all() and int((fast[0].weights != 0).sum()) == 2


@pytest.mark.parametrize("case", ["critic", "actor"])
def test_gradient_balancers_take_the_fast_path(case, no_vmap):
    module, terms = {"critic": critic_case, "actor": actor_case}[case]()
    stats, grads = run("terms", module, terms, build("cagrad"), data())
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    assert torch.isfinite(stats.grad_norms).all()


@pytest.mark.parametrize("path", ["bmm", "onednn-per-block"])
def test_block_gradients_are_the_per_block_gradients(path, monkeypatch):
    if path == "onednn-per-block":  # these blocks and layers are below its thresholds
        monkeypatch.setattr(onednn, "_MIN_ROWS_PER_BLOCK", 1)
        monkeypatch.setattr(onednn, "_MIN_FEATURES_PER_BLOCK", 1)
    torch.manual_seed(0)
    net = mlp(OBS, (16, 16), 2)
    params = dict(net.named_parameters())
    x = torch.randn(N, OBS)
    with onednn.block_gradients(K, N) as recorded:
        terms = net(x).pow(2).sum(1)
    assert [p for p, _ in recorded] == list(params.values())
    losses = terms.view(K, -1).mean(1)
    per_block = torch.autograd.grad(losses.sum(), [probe for _, probe in recorded])
    for k in range(K):
        want = torch.autograd.grad(net(x[k * N_PER : (k + 1) * N_PER]).pow(2).sum(1).mean(),
                                   list(params.values()))  # fmt: skip
        for got, w in zip(per_block, want, strict=True):
            assert got.shape == (K, *w.shape)
            torch.testing.assert_close(got[k], w, rtol=1e-5, atol=1e-6)
    # the parameters themselves got nothing through these layers
    assert all(p.grad is None for p in params.values())


def _extra_param_case():
    """A parameter outside any mtrl.onednn layer (like the SAC log-temperature)."""
    module, terms = critic_case()
    module.scale = nn.Parameter(torch.tensor(1.5))

    def terms2(params, *rows):
        inner = {k: v for k, v in params.items() if k != "scale"}
        return params["scale"] * terms(inner, *rows)

    return module, terms2


def _outside_use_case():
    """A layer's weight also used by a plain op (its gradient must not be lost)."""
    module, terms = critic_case()

    def terms2(params, *rows):
        return terms(params, *rows) + params["members.0.0.weight"].pow(2).sum()

    return module, terms2


def _twice_on_more_rows_case():
    """A layer stack fed 2N rows: its rows are not the batch rows."""
    module, _ = critic_case()

    def terms2(params, obs, act, y, task):
        both = functional_call(module, params, (torch.cat([obs, obs]), torch.cat([act, -act])))
        n = obs.shape[0]
        return both[:, :n].sum(0) * both[:, n:].sum(0) - y

    return module, terms2


@pytest.mark.parametrize("make", [_extra_param_case, _outside_use_case, _twice_on_more_rows_case])
def test_fallback_to_vmap_when_the_layers_do_not_cover_the_parameters(make, vmap_calls):
    module, terms = make()
    rows = data()
    fast = run("terms", module, terms, build("cagrad"), rows)
    assert vmap_calls == [1]  # the terms path fell back
    ref = run("vmap", module, terms, build("cagrad"), rows)
    assert_same_result(fast, ref)


def test_twice_on_the_batch_rows_sums_both_uses(vmap_calls):
    """The same stack applied to two N-row inputs: two probes per parameter, summed."""
    module, _ = critic_case()

    def terms(params, obs, act, y, task):
        q1 = functional_call(module, params, (obs, act)).min(0).values
        q2 = functional_call(module, params, (obs, -act)).min(0).values
        return (q1 - q2 - y) ** 2

    rows = data()
    fast = run("terms", module, terms, build("cagrad"), rows)
    assert vmap_calls == []
    ref = run("vmap", module, terms, build("cagrad"), rows)
    assert_same_result(fast, ref)


def test_a_no_grad_use_of_the_layers_records_nothing(vmap_calls):
    """A baseline from the same critic under no_grad: no probe for it, same result."""
    module, terms = critic_case()

    def terms2(params, obs, act, y, task):
        with torch.no_grad():
            base = functional_call(module, params, (obs, act)).mean(0)
        return terms(params, obs, act, y, task) - base

    rows = data()
    params = dict(module.named_parameters())
    with onednn.block_gradients(K, N) as recorded:
        terms2(params, *rows)
    assert len(recorded) == len(params)  # one probe per parameter: the grad-enabled call
    fast = run("terms", module, terms2, build("cagrad"), rows)
    assert vmap_calls == []
    ref = run("vmap", module, terms2, build("cagrad"), rows)
    assert_same_result(fast, ref)


@pytest.mark.parametrize("setting", ["float64", "onednn-off"])
def test_fallback_without_onednn_layers(setting, vmap_calls):
    dtype = torch.float64 if setting == "float64" else torch.float32
    module, terms = critic_case(dtype=dtype)
    rows = data(dtype)
    was = onednn.enabled()
    try:
        if setting == "onednn-off":
            onednn.set_enabled(False)
        fast = run("terms", module, terms, build("cagrad"), rows)
        ref = run("vmap", module, terms, build("cagrad"), rows)
    finally:
        onednn.set_enabled(was)
    assert len(vmap_calls) == 2
    assert_same_result(fast, ref, rtol=1e-12 if dtype == torch.float64 else 1e-6)


def test_errors():
    module, terms = critic_case()
    params = dict(module.named_parameters())
    rows = data()
    with pytest.raises(ValueError, match="rows of data must split into 5 equal task blocks"):
        balanced_backward_terms(terms, params, rows, 5, build("cagrad"))
    with pytest.raises(ValueError, match="num_tasks must be a positive integer"):
        balanced_backward_terms(terms, params, rows, 0, build("cagrad"))
    with pytest.raises(ValueError, match="same number of rows"):
        balanced_backward_terms(terms, params, (rows[0], rows[1][:-1]), K, build("cagrad"))
    with pytest.raises(ValueError, match=r"one term per data row, shape \(24,\), got \(2, 24\)"):
        balanced_backward_terms(lambda p, *r: terms(p, *r).expand(2, N), params, rows, K,
                                build("mean"))  # fmt: skip
    # 2N terms (both critic members, member-major) would split into wrong task blocks
    def twice(p, *r):
        return torch.cat([terms(p, *r), terms(p, *r)])

    wrong = r"one term per data row, shape \(\d+,\), got \(\d+,\)"
    for name in ("mean", "cagrad", "sdmgrad-os"):
        with pytest.raises(ValueError, match=wrong):
            balanced_backward_terms(twice, params, rows, K, build(name))
    blocks = [t.reshape(K, N_PER, *t.shape[1:]) for t in rows]
    with pytest.raises(ValueError, match=r"one term per data row, shape \(6,\), got \(12,\)"):
        balanced_backward(mean_of_terms(twice), params, blocks, build("cagrad"))
    with pytest.raises(ValueError, match="positive multiple of blocks"):
        with onednn.block_gradients(3, 10):
            pass
    with onednn.block_gradients(2, 4):
        with pytest.raises(RuntimeError, match="already active"):
            with onednn.block_gradients(2, 4):
                pass
    with onednn.block_gradients(2, 4) as recorded:  # state was reset after the error
        assert recorded == []


# ----------------------------------------------------------------- the row contract
def _reordered_case():
    """Row i's term depends on data row i only, but the layers see the rows rolled."""
    module, terms = critic_case()

    def terms2(params, obs, act, y, task):
        rolled = [t.roll(3, 0) for t in (obs, act, y, task)]
        return terms(params, *rolled).roll(-3, 0)

    return module, terms2


def _table_case():
    """A second stack fed a constant table that happens to have N rows."""
    critic, terms = critic_case()
    module = nn.Module()
    module.critic, module.enc = critic, mlp(5, (16,), OBS)
    table = torch.randn(N, 5, generator=torch.Generator().manual_seed(5))

    def terms2(params, obs, act, y, task):
        def sub(prefix):
            return {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith(prefix)}

        shift = functional_call(module.enc, sub("enc."), (table,)).mean(0)
        return terms(sub("critic."), obs + shift, act, y, task)

    return module, terms2


def _random_case():
    module, terms = critic_case()

    def terms2(params, *rows):
        return terms(params, *rows) + 1e-3 * torch.randn(N)

    return module, terms2


@pytest.mark.parametrize("make", [_reordered_case, _table_case, _random_case])
def test_verify_catches_a_broken_row_contract(make):
    module, terms = make()
    rows = data()
    params = dict(module.named_parameters())
    with pytest.raises(ValueError, match="breaks the row contract.*fast_path=False"):
        balanced_backward_terms(terms, params, rows, K, build("cagrad"), verify=True)
    if make is not _random_case:  # the vmap path is right for these terms
        slow = run("terms", module, terms, build("cagrad"), rows, fast_path=False)
        assert_same_result(slow, run("vmap", module, terms, build("cagrad"), rows))


@pytest.mark.parametrize("case", ["critic", "critic-multihead", "actor"])
@pytest.mark.parametrize("name", ["cagrad", "sdmgrad-os"])
def test_verify_accepts_the_sac_losses(case, name, no_vmap):
    module, terms = {"critic": critic_case, "critic-multihead": lambda: critic_case(heads=K),
                     "actor": actor_case}[case]()  # fmt: skip
    rows = data()
    rng = torch.get_rng_state()
    checked = run("terms", module, terms, BALANCERS[name](), rows, verify=True)
    assert torch.equal(torch.get_rng_state(), rng)  # its coefficients use their own generator
    assert_same_result(checked, run("terms", module, terms, BALANCERS[name](), rows), rtol=0)


def test_fast_path_false_takes_the_vmap_path(vmap_calls):
    module, terms = critic_case()
    rows = data()
    slow = run("terms", module, terms, build("cagrad"), rows, fast_path=False)
    assert vmap_calls == [1]
    assert_same_result(slow, run("terms", module, terms, build("cagrad"), rows))


def test_verify_with_a_frozen_parameter():
    module, terms = critic_case()
    frozen = module.members[0][0].bias
    frozen.requires_grad_(False)
    params = dict(module.named_parameters())
    rows = data()
    balanced_backward_terms(terms, params, rows, K, build("cagrad"), verify=True)
    fast = {n: p.grad.clone() for n, p in params.items() if p.requires_grad}
    for p in params.values():
        p.grad = None
    blocks = [t.reshape(K, N_PER, *t.shape[1:]) for t in rows]
    balanced_backward(mean_of_terms(terms), params, blocks, build("cagrad"))
    assert frozen.grad is None
    for name, g in fast.items():
        torch.testing.assert_close(g, params[name].grad, rtol=1e-6, atol=1e-8, msg=name)
