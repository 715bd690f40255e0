"""Balancer plug-ins: entry points of an installed distribution and ``module:Class`` paths."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

from mtrl.balancers import build, get_class, names
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
