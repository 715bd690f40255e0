"""Balancer plug-ins: entry points of an installed distribution and ``module:Class`` paths."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
import uuid
import warnings
from pathlib import Path

import pytest
import torch

from mtrl.balancers import build, get_class, names
from mtrl.balancers.famo import FAMO
from mtrl.testing import check_balancer

PLUGIN_SOURCE = '''
import torch
from mtrl.balancers import Balancer


class HalfMean(Balancer):
    """Test plug-in: the mean of the rows scaled by ``factor``."""

    name = "half-mean"

    def __init__(self, factor: float = 1.0):
        super().__init__()
        if factor <= 0:
            raise ValueError(f"factor must be > 0, got {factor}")
        self.factor = factor

    def weights(self, gram, losses):
        k = gram.shape[0]
        return torch.full((k,), self.factor / k, dtype=torch.float64)


class NotABalancer:
    pass
'''


def install_plugin(
    root: Path, monkeypatch: pytest.MonkeyPatch, *, source: str, entry_points: dict[str, str]
) -> str:
    """Write ``<module>.py`` and a ``<dist>.dist-info`` with the given entry points under
    ``root`` and put ``root`` on ``sys.path``. Returns the (unique) module name."""
    module = f"mtrl_test_plugin_{uuid.uuid4().hex[:10]}"
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    dist = root / f"{module}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    lines = ["[mtrl.balancers]"] + [
        f"{name} = {value.format(module=module)}" for name, value in entry_points.items()
    ]
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    monkeypatch.delitem(sys.modules, module, raising=False)
    return module


@pytest.fixture
def plugin(tmp_path, monkeypatch) -> str:
    module = install_plugin(
        tmp_path,
        monkeypatch,
        source=PLUGIN_SOURCE,
        entry_points={"half-mean": "{module}:HalfMean", "not-a-balancer": "{module}:NotABalancer"},
    )
    yield module
    sys.modules.pop(module, None)


def test_entry_point_listed_and_built(plugin):
    assert "half-mean" in names()
    assert names() == sorted(names())
    b = build("half-mean", factor=0.5)
    assert type(b).__module__ == plugin
    g = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    assert torch.allclose(b.combine(g), torch.tensor([0.5, 0.5]))
    assert repr(b) == "HalfMean(factor=0.5)"


def test_entry_point_passes_check_balancer(plugin):
    check_balancer("half-mean")
    check_balancer(get_class("half-mean"))


def test_check_balancer_catches_broken_scale(plugin):
    with pytest.raises(
        AssertionError, match=r"check_balancer\[half-mean\]: K=1: expected that row"
    ):
        check_balancer(lambda: build("half-mean", factor=0.5))


def test_entry_point_hparam_errors(plugin):
    with pytest.raises(ValueError, match="valid hyper-parameters: factor"):
        build("half-mean", c=1.0)
    with pytest.raises(ValueError, match="half-mean.*factor must be > 0"):
        build("half-mean", factor=-1.0)


def test_entry_point_not_a_balancer(plugin):
    assert "not-a-balancer" in names()
    with pytest.raises(ValueError, match="not-a-balancer.*not name a subclass"):
        build("not-a-balancer")


def test_module_class_path(plugin):
    b = build(f"{plugin}:HalfMean", factor=2.0)
    assert b.hparams() == {"factor": 2.0}
    check_balancer(lambda: build(f"{plugin}:HalfMean"))
    with pytest.raises(ValueError, match="not name a subclass"):
        build(f"{plugin}:NotABalancer")
    with pytest.raises(ValueError, match="cannot load balancer.*Missing"):
        build(f"{plugin}:Missing")
    with pytest.raises(ValueError, match="cannot load balancer"):
        build("no_such_module_mtrl_xyz:Thing")


def test_broken_plugin_does_not_break_import_or_names(tmp_path, monkeypatch):
    module = install_plugin(
        tmp_path,
        monkeypatch,
        source="raise RuntimeError('plug-in exploded on import')\n",
        entry_points={"exploding": "{module}:Thing"},
    )
    assert "exploding" in names()
    assert "cagrad" in names()
    with pytest.raises(ValueError) as exc:
        build("exploding")
    msg = str(exc.value)
    assert "exploding" in msg and module in msg and "plug-in exploded on import" in msg
    # built-ins keep working
    assert torch.isfinite(build("cagrad").combine(torch.randn(3, 4))).all()
    sys.modules.pop(module, None)


def test_broken_plugin_fresh_interpreter_import(tmp_path, monkeypatch):
    """`import mtrl` / `names()` in a new process with a broken plug-in installed."""
    install_plugin(
        tmp_path,
        monkeypatch,
        source="raise ImportError('missing dependency')\n",
        entry_points={"exploding": "{module}:Thing"},
    )
    code = (
        "import mtrl, mtrl.balancers as b; n = b.names(); "
        "assert 'exploding' in n and 'mgda' in n; print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_check_balancer_rejects_non_balancer_factory():
    with pytest.raises(AssertionError, match="not a Balancer"):
        check_balancer(lambda: object())
    with pytest.raises(TypeError):
        check_balancer(42)


def test_weights_of_the_wrong_shape_are_a_clear_error():
    from mtrl.balancers import Balancer

    class OneTooMany(Balancer):
        name = "one-too-many"

        def weights(self, gram, losses):
            return torch.full((gram.shape[0] + 1,), 1.0 / gram.shape[0], dtype=torch.float64)

    g = torch.randn(4, 12, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"'one-too-many': weights\(\) returned \(5,\) for 4 "
                                         r"task rows; it must return a \(4,\) tensor"):
        OneTooMany().combine(g)
    with pytest.raises(AssertionError, match=r"combine raised ValueError: balancer "
                                             r"'one-too-many': weights\(\) returned"):
        check_balancer(OneTooMany)


SHADOW_SOURCE = '''
from mtrl.balancers.mean import Mean


class MyMean(Mean):
    name = "my-mean"
'''


def test_a_plugin_named_like_a_builtin_or_offered_twice_is_ignored_with_a_warning(
        tmp_path, monkeypatch):
    """An entry point named like a built-in (``mean = mypkg:MyMean``) was never loaded
    and said nothing; two packages offering one name were settled silently (the last
    won). Both are now warnings that name the entry points."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first = install_plugin(tmp_path / "a", monkeypatch, source=SHADOW_SOURCE,
                           entry_points={"mean": "{module}:MyMean", "twice": "{module}:MyMean"})
    second = install_plugin(tmp_path / "b", monkeypatch, source=SHADOW_SOURCE,
                            entry_points={"twice": "{module}:MyMean"})
    with pytest.warns(UserWarning) as caught:
        listed = names()
    text = " | ".join(str(w.message) for w in caught)
    assert (f"balancer plug-in 'mean' ('{first}:MyMean' from {first}) is ignored: 'mean' is "
            "a built-in balancer") in text
    assert "balancer plug-in name 'twice' is offered by 2 entry points" in text
    assert f"'{first}:MyMean' from {first}" in text and f"'{second}:MyMean' from {second}" in text
    assert listed.count("mean") == 1 and "twice" not in listed
    assert get_class("mean").__module__ == "mtrl.balancers.mean"  # (the built-in first)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="unknown balancer 'twice'"):
        build("twice")
    with pytest.warns(UserWarning) as again:  # (each lookup of a plug-in says it)
        assert type(build(f"{second}:MyMean")).__module__ == second  # a path names either
    assert len(again) == 2
    sys.modules.pop(first, None), sys.modules.pop(second, None)


def test_a_subclass_passing_kwargs_on_takes_its_parents_hyper_parameters(tmp_path,
                                                                        monkeypatch):
    module = install_plugin(tmp_path, monkeypatch, source='''
from mtrl.balancers.cagrad import CAGrad


class MyCAGrad(CAGrad):
    name = "my-cagrad"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
''', entry_points={})
    b = build(f"{module}:MyCAGrad", c=0.3)  # "unknown hyper-parameter(s) c" before
    assert repr(b) == "MyCAGrad(c=0.3)" and b.hparams() == {"c": 0.3}
    with pytest.raises(ValueError, match="valid hyper-parameters: c"):
        build(f"{module}:MyCAGrad", alpha=1.0)
    sys.modules.pop(module, None)


def test_check_balancer_on_plugins_that_edit_inputs_or_hide_settings():
    """Found by an audit (2026-11-29): a weights() that edits the Gramian or the losses in
    place changed the caller's losses and the logged gradient statistics; check_balancer
    called weights() on a loss-blind balancer that implements only combine_rows, and
    passed a hyper-parameter that repr could not show."""
    from mtrl.balancers import Balancer
    from mtrl.grad import balanced_backward

    class Ridge(Balancer):  # mean weights after editing both inputs in place
        name = "ridge"

        def weights(self, gram, losses):
            gram.diagonal().add_(100.0)
            if losses is not None:
                losses -= losses.max()
            return torch.full((gram.shape[0],), 1.0 / gram.shape[0], dtype=torch.float64)

    check_balancer(Ridge)  # its inputs are copies now
    losses = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    Ridge().combine(torch.randn(3, 5, dtype=torch.float64), losses)
    assert losses.tolist() == [1.0, 2.0, 3.0]
    w = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    x = torch.randn(3, 4, 5, dtype=torch.float64)

    def loss(params, x):
        return (params["w"] * x).sum(-1).pow(2).mean()

    class Plain(Ridge):  # the same weights, inputs untouched
        name = "plain"

        def weights(self, gram, losses):
            return torch.full((gram.shape[0],), 1.0 / gram.shape[0], dtype=torch.float64)

    stats = {}
    for b in (Plain(), Ridge()):
        w.grad = None
        stats[b.name] = balanced_backward(loss, {"w": w}, [x], b, diagnostics=True)
    for key in ("grad_norms", "mean_cosine"):
        got, want = getattr(stats["ridge"], key), getattr(stats["plain"], key)
        assert torch.isfinite(want).all()
        torch.testing.assert_close(got, want, rtol=0, atol=0)

    class ShiftsLosses(Balancer):  # its own combine_rows, editing the losses
        name = "shifts-losses"

        def combine_rows(self, grads, losses=None):
            if losses is not None:
                losses -= 1.0
            return grads.mean(0)

    with pytest.raises(AssertionError, match="combine modified its input losses in place"):
        check_balancer(ShiftsLosses)

    class RowMean(Balancer):  # loss-blind, only combine_rows: a correct balancer
        name = "row-mean"
        reads_losses = False

        def combine_rows(self, grads, losses=None):
            return grads.mean(0)

    check_balancer(RowMean)  # NotImplementedError from weights() before

    class HiddenSetting(Balancer):
        name = "hidden-setting"

        def __init__(self, temperature: float = 1.0):
            super().__init__()
            self._t = temperature

        def weights(self, gram, losses):
            return torch.full((gram.shape[0],), 1.0 / gram.shape[0], dtype=torch.float64)

    with pytest.raises(AssertionError, match="'temperature' is not kept as the attribute "
                                             "self.temperature"):
        check_balancer(HiddenSetting)


def test_one_entry_point_seen_twice_is_not_a_clash(tmp_path, monkeypatch):
    """The same `name = module:Class` found twice (one distribution on two sys.path
    entries) is one plug-in, not two packages offering a name."""
    import mtrl.balancers.registry as registry

    module = install_plugin(tmp_path, monkeypatch, source=SHADOW_SOURCE,
                            entry_points={"twice": "{module}:MyMean"})
    (ep,) = [e for e in registry.entry_points(group=registry.ENTRY_POINT_GROUP)
             if e.name == "twice"]
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep, ep])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "twice" in names()
        assert type(build("twice")).__module__ == module
    sys.modules.pop(module, None)


def test_a_subclass_default_overrides_its_parents(tmp_path, monkeypatch):
    """`mtrl balancers` shows a subclass's own default, not the parent's (c=0.5, not 0.9)."""
    from mtrl.balancers.registry import hparam_defaults

    module = install_plugin(tmp_path, monkeypatch, source='''
from mtrl.balancers.cagrad import CAGrad


class HalfCAGrad(CAGrad):
    name = "half-cagrad"

    def __init__(self, c=0.5, **kwargs):
        super().__init__(c=c, **kwargs)
''', entry_points={})
    cls = type(build(f"{module}:HalfCAGrad"))
    assert hparam_defaults(cls) == {"c": 0.5}
    assert build(f"{module}:HalfCAGrad").c == 0.5
    sys.modules.pop(module, None)


def test_a_plugin_named_like_a_builtins_preset_is_benchmarked_without_it(tmp_path,
                                                                         monkeypatch):
    """A plug-in `nash_mtl` (configs/mt10_nash_mtl.json is nash-mtl's preset): `mtrl bench
    --benchmark MT10 --balancers nash_mtl` failed with "preset ... is for balancer
    'nash-mtl', not 'nash_mtl'" although `mtrl train` accepts it."""
    from mtrl.bench import run_config

    install_plugin(tmp_path, monkeypatch, source=SHADOW_SOURCE,
                   entry_points={"nash_mtl": "{module}:MyMean"})
    cfg = run_config("MT10", "nash_mtl", 0, 100, "mtrl", tmp_path / "run")
    assert (cfg.balancer, cfg.balancer_kwargs) == ("nash_mtl", {})
    builtin = run_config("MT10", "nash-mtl", 0, 100, "mtrl", tmp_path / "run")
    assert builtin.balancer == "nash-mtl" and builtin.balancer_kwargs  # its preset's


class NeedsGamma(FAMO):
    """FAMO with a required hyper-parameter: it builds only with the bench's --set."""

    def __init__(self, gamma: float, lr: float = 0.025):
        super().__init__(gamma=gamma, lr=lr)


def test_bench_defaults_the_balanced_losses_with_the_set_kwargs(tmp_path):
    """A balancer needing non-negative losses that builds only with its --set kwargs got
    the general sac.balance (critic, actor, alpha) and was refused; `mtrl train` gives it
    the critic only."""
    from mtrl.bench import run_config

    cfg = run_config("toy", f"{__name__}:NeedsGamma", 0, 100, "mtrl", tmp_path / "run",
                     overrides={"balancer_kwargs": {"gamma": 0.01}})
    assert cfg.sac.balance == ("critic",) and cfg.balancer_kwargs == {"gamma": 0.01}
