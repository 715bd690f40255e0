"""EnvConfig: boundaries and error messages that
name the valid choices (the module's contract: one ValueError naming them)."""

from __future__ import annotations

import pytest

from mtrl.envs import EnvConfig
from mtrl.envs.config import benchmark_task_names


def test_seed_range_ends_at_two_to_the_32_minus_one():
    """Seeds feed 32-bit generators: 2**32 - 1 is the last valid one, 2**32 is refused."""
    assert EnvConfig(benchmark="toy", seed=2**32 - 1).seed == 2**32 - 1
    with pytest.raises(ValueError,
                       match=r"seed must be an integer in 0\.\.2\*\*32-1; got 4294967296"):
        EnvConfig(benchmark="toy", seed=2**32)


def test_a_benchmark_without_a_fixed_task_list_names_the_ones_with_one():
    with pytest.raises(ValueError, match=r"'MT1' has no fixed task list; choose 'MT10' or 'MT50'$"):
        benchmark_task_names("MT1")


@pytest.mark.parametrize(("kwargs", "message"), [
    # a lone string is not split into letters ('r', 'e', ...): the list is asked for
    (dict(benchmark="custom", tasks="reach-v3"),
     r"benchmark 'custom' needs `tasks`: a non-empty list"),
    (dict(benchmark="custom", tasks=()), r"benchmark 'custom' needs `tasks`: a non-empty list"),
    # MT1 takes one `task`; a `tasks` list with it is a mistake, not ignored
    (dict(benchmark="MT1", task="reach-v3", tasks=("push-v3",)),
     r"takes `task`, not `tasks`; use 'custom'"),
    # an empty device string is not a device
    (dict(benchmark="toy", device=""), r"device must be a torch device string"),
])
def test_more_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EnvConfig(**kwargs)
