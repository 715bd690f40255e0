"""CLI: exit codes of errors raised inside a
command, ``mtrl eval``'s own argument check, the warning hook being put back, and
``--sac.balance=VALUE`` (the ``=`` spelling) counting as given.

Training itself is replaced by a stub that records the config it was given, so each test
runs in milliseconds and checks only what the command line turns into.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from test_cli import run_cli

import mtrl.cli
import mtrl.trainer
from mtrl.config import ConfigError, validate
from mtrl.trainer import TrainingError


@pytest.fixture
def fake_train(monkeypatch):
    """Replace ``mtrl.trainer.train`` by a stub; returns the list of configs it got."""
    got = []

    def train(cfg, resume=False):
        got.append(cfg)
        return mtrl.trainer.TrainResult(run_dir=Path(cfg.run_dir or "."), steps=cfg.total_steps,
                                        final_eval=None, skipped_updates=0)

    monkeypatch.setattr(mtrl.trainer, "train", train)
    return got


@pytest.mark.parametrize(("exc", "code"), [
    (ValueError("bad value"), 2),  # a user's bad value: exit status 2, like the others
    (TrainingError("diverged"), 1),  # the run failed: 1
    (FloatingPointError("NaN weights"), 1),  # an ArithmeticError (plug-in NaN): 1
])
def test_errors_raised_inside_a_command_get_their_exit_status(capsys, monkeypatch, exc, code):
    """The module contract: user errors exit 2, failures exit 1, one ``error:`` line each."""

    def command(argv):
        raise exc

    monkeypatch.setitem(mtrl.cli.COMMANDS, "eval", command)
    got, _, err = run_cli(["eval", "somewhere"], capsys)
    assert got == code
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert str(exc) in err


def test_eval_refuses_zero_episodes_before_looking_at_the_run(capsys):
    """``--episodes-per-task 0`` is its own error (exit 2), not a missing-run error."""
    code, _, err = run_cli(["eval", "/no/such/run", "--episodes-per-task", "0"], capsys)
    assert code == 2
    assert err.strip() == "error: --episodes-per-task must be >= 1"
    # 1 is accepted by the check (the missing run is what fails then)
    code, _, err = run_cli(["eval", "/no/such/run", "--episodes-per-task", "1"], capsys)
    assert code == 2 and "--episodes-per-task" not in err


def test_the_warning_hook_is_put_back_after_a_command(capsys):
    """``main`` shows warnings as ``warning: ...`` lines only while a command runs; a
    caller embedding ``main`` (the tests, a notebook) gets its own hook back, also after an
    error."""
    before = warnings.showwarning
    assert run_cli(["balancers"], capsys)[0] == 0
    assert warnings.showwarning is before
    assert run_cli(["balancers", "extra"], capsys)[0] == 2
    assert warnings.showwarning is before


def test_famo_balances_the_critic_only_unless_told_otherwise(tmp_path, capsys, fake_train):
    """``--balancer famo`` without a preset was refused (the default balances the actor and
    temperature losses too, which can be negative); it now takes FAMO's default, as the
    famo presets do, and says so."""
    common = ["--env.benchmark", "toy", "--no-progress"]
    code, _, err = run_cli(["train", "--balancer", "famo", *common,
                            "--run-dir", str(tmp_path / "a")], capsys)
    assert code == 0, err
    assert fake_train[-1].sac.balance == ("critic",)
    assert ("warning: sac.balance is the default ['critic'] for famo (it needs non-negative "
            "task losses); set another with --sac.balance") in err
    code, _, err = run_cli(["train", "--config", "mt10_mean", "--balancer", "famo", *common,
                            "--run-dir", str(tmp_path / "b")], capsys)
    assert code == 0, err
    assert fake_train[-1].sac.balance == ("critic",)
    assert ("warning: --balancer famo replaces mean: its sac.balance ['critic', 'actor', "
            "'alpha'] is reset to the default ['critic'] for famo") in err
    # given, it stays (and a signed loss is then the config error it was)
    code, _, err = run_cli(["train", "--balancer", "famo", "--sac.balance", "critic", "actor",
                            *common, "--run-dir", str(tmp_path / "c")], capsys)
    assert fake_train[-1].sac.balance == ("critic", "actor") and "sac.balance" not in err
    with pytest.raises(ConfigError, match="famo' needs non-negative task losses"):
        validate(fake_train[-1])


def test_sac_balance_given_with_equals_sign_is_kept(tmp_path, capsys, fake_train):
    """FAMO's preset balances the critic only; ``--balancer cagrad`` resets that to the
    default unless ``--sac.balance`` is given. ``--sac.balance=critic`` (one token) is
    given too: the user's choice stays and no reset warning is printed."""
    common = ["--config", "mt10_famo", "--balancer", "cagrad", "--env.benchmark", "toy",
              "--no-progress"]
    code, _, err = run_cli(["train", *common, "--sac.balance=critic",
                            "--run-dir", str(tmp_path / "eq")], capsys)
    assert code == 0, err
    assert fake_train[-1].sac.balance == ("critic",)
    assert "sac.balance" not in err
    # without it, the reset (the behaviour the option exists to override)
    code, _, err = run_cli(["train", *common, "--run-dir", str(tmp_path / "none")], capsys)
    assert code == 0, err
    assert fake_train[-1].sac.balance == ("critic", "actor", "alpha")
    assert "is reset to the default" in err
