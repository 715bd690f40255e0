"""evaluate() on a scripted two-task env (no Meta-World): success at any step of an
episode, reset between episodes, the mean over tasks; and the evaluation seeds."""

from __future__ import annotations

import numpy as np
import torch

from mtrl.envs import Step, eval_seed, evaluate


class ScriptedEnv:
    """Two tasks, 3-step episodes ended by the time limit; ``success[k][t]`` and
    ``reward[k][t]`` give task k's values on its (t+1)-th step since the first reset."""

    num_tasks, obs_dim, act_dim = 2, 3, 1
    task_names = ["a", "b"]
    L = 3

    def __init__(self, success: list[list[bool]], reward: list[list[float]]) -> None:
        self.success, self.reward = success, reward
        self.t = 0
        self.reset_seeds: list[int | None] = []

    def reset(self, seed: int | None = None) -> torch.Tensor:
        self.reset_seeds.append(seed)
        self.t = 0
        return torch.zeros(self.num_tasks, self.obs_dim)

    def step(self, actions: torch.Tensor) -> Step:
        t, self.t = self.t, self.t + 1
        ended = torch.full((self.num_tasks,), (t + 1) % self.L == 0)
        obs = torch.full((self.num_tasks, self.obs_dim), float(self.t))
        return Step(obs=obs, next_obs=obs, reward=torch.tensor([r[t] for r in self.reward]),
                    terminated=torch.zeros(self.num_tasks, dtype=torch.bool), truncated=ended,
                    success=torch.tensor([s[t] for s in self.success]))


def test_evaluate_counts_success_at_any_step_and_resets_it_between_episodes():
    """Two episodes of 3 steps per task (s = success on that step):

        task a: episode 1 = [s, -, -]  (success before the last step only)  -> True
                episode 2 = [-, -, -]                                      -> False
        task b: episode 1 = [-, s, -]                                      -> True
                episode 2 = [-, -, s]  (success on the last step)          -> True

    so the success rates are a: 1/2, b: 2/2, and mean_success = (0.5 + 1) / 2 = 0.75 (the
    mean over tasks, not the best task's 1.0). Returns are the per-episode sums.
    """
    F, T = False, True
    env = ScriptedEnv(
        success=[[T, F, F, F, F, F], [F, T, F, F, F, T]],
        reward=[[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [0.5, 0.5, 0.5, -1.0, -1.0, -1.0]],
    )
    r = evaluate(lambda o: torch.zeros(o.shape[0], 1), env, episodes_per_task=2, seed=7)
    np.testing.assert_array_equal(r.episode_success, [[T, F], [T, T]])
    assert r.success_rate == {"a": 0.5, "b": 1.0}
    assert r.mean_success == 0.75
    np.testing.assert_allclose(r.episode_return, [[6.0, 15.0], [1.5, -3.0]])
    assert r.mean_return == {"a": 10.5, "b": -0.75}
    assert r.env_steps == 2 * 6 and env.reset_seeds == [7]


class UnevenEnv(ScriptedEnv):
    """ScriptedEnv whose task k's episodes last ``lengths[k]`` steps."""

    def __init__(self, success, reward, lengths: list[int]) -> None:
        super().__init__(success, reward)
        self.lengths = lengths

    def step(self, actions: torch.Tensor) -> Step:
        out = super().step(actions)
        ended = torch.tensor([self.t % n == 0 for n in self.lengths])
        return out._replace(truncated=ended)


def test_evaluate_ignores_the_extra_episodes_of_tasks_that_finish_early():
    """Task a has 2-step episodes, task b 4-step ones; 2 episodes per task take 8 steps,
    in which a finishes 4. a's episodes 3 and 4 (both successes, large returns) must not
    count: a's rate stays 1/2 and its returns are those of episodes 1 and 2 (found by an
    audit: every earlier case ended all tasks together, or had only successes)."""
    F, T = False, True
    env = UnevenEnv(
        success=[[T, F, F, F, T, F, F, T], [F, F, F, F, F, F, F, T]],
        reward=[[1.0, 1.0, 2.0, 2.0, 50.0, 50.0, 70.0, 70.0], [0.25] * 8],
        lengths=[2, 4],
    )
    r = evaluate(lambda o: torch.zeros(o.shape[0], 1), env, episodes_per_task=2)
    np.testing.assert_array_equal(r.episode_success, [[T, F], [F, T]])
    np.testing.assert_allclose(r.episode_return, [[2.0, 4.0], [1.0, 1.0]])
    assert r.success_rate == {"a": 0.5, "b": 0.5} and r.mean_return["a"] == 3.0
    assert r.env_steps == 2 * 8


def test_evaluate_reports_each_vector_step():
    """``on_step`` (a progress bar's update) is called once per vector-env step: for
    episodes ended by the time limit, episodes × L calls, the bar's total."""
    env = ScriptedEnv(success=[[False] * 9] * 2, reward=[[0.0] * 9] * 2)
    calls = []
    r = evaluate(lambda o: torch.zeros(o.shape[0], 1), env, episodes_per_task=3,
                 on_step=lambda: calls.append(env.t))
    assert calls == list(range(1, 3 * ScriptedEnv.L + 1))
    assert r.env_steps == 2 * len(calls)


def test_eval_seed_depends_on_the_seed_and_the_step():
    """Different training steps get different evaluation seeds (random goals differ between
    evaluations); the same (seed, step) always gives the same one."""
    assert eval_seed(0, 10) == eval_seed(0, 10)
    by_step = {eval_seed(0, step) for step in (0, 10, 20, 10_000)}
    assert len(by_step) == 4
    assert eval_seed(1, 10) != eval_seed(0, 10)
