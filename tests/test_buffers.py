import io

import pytest
import torch

from mtrl.buffers import Batch, MultiTaskReplayBuffer

K, OBS, ACT = 4, 6, 2


def fill(buf: MultiTaskReplayBuffer, steps: int, start: int = 0) -> None:
    """Each stored value encodes (task, step): obs[..., 0] = 1000 * task + step."""
    for s in range(start, start + steps):
        tasks = torch.arange(buf.num_tasks, dtype=torch.float32)
        code = 1000 * tasks + s
        obs = code[:, None].expand(buf.num_tasks, buf.obs_dim).clone()
        buf.add(
            obs=obs,
            action=code[:, None].expand(buf.num_tasks, buf.act_dim).clone(),
            reward=code,
            next_obs=obs + 0.5,
            done=(torch.arange(buf.num_tasks) == 0).float(),
        )


def assert_same_batch(a: Batch, b: Batch) -> None:
    assert a.task_major == b.task_major
    for name in ("obs", "action", "reward", "next_obs", "done", "task_id"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_stratified_counts_layout_and_content():
    buf = MultiTaskReplayBuffer(10, K, OBS, ACT, seed=0)
    fill(buf, 7)
    b = buf.sample(40, stratified=True)
    assert isinstance(b, Batch) and b.task_major is True
    assert b.obs.shape == (40, OBS) and b.action.shape == (40, ACT)
    assert b.reward.shape == (40,) and b.done.shape == (40,) and b.task_id.shape == (40,)
    # Exactly B/K per task, task-major, reshapes to [K, B/K] without copying.
    assert torch.equal(b.task_id, torch.arange(K).repeat_interleave(10))
    blocks = b.obs.view(K, 10, OBS)
    assert blocks.data_ptr() == b.obs.data_ptr()
    for t in range(K):
        codes = blocks[t, :, 0]
        assert torch.all(codes // 1000 == t)  # every row of block t belongs to task t
        assert torch.all((codes % 1000) < 7)  # only stored steps are sampled
    # Fields stay aligned row by row.
    assert torch.equal(b.next_obs, b.obs + 0.5)
    assert torch.equal(b.reward, b.obs[:, 0])
    assert torch.equal(b.action[:, 0], b.obs[:, 0])
    assert torch.equal(b.done, (b.task_id == 0).float())


def test_ring_overwrites_per_task_only_its_own_oldest():
    cap = 5
    buf = MultiTaskReplayBuffer(cap, K, OBS, ACT)
    fill(buf, 8)  # steps 0..7; each ring keeps steps 3..7
    assert buf.size.tolist() == [cap] * K
    assert buf.pos.tolist() == [8 % cap] * K
    for t in range(K):
        steps = sorted((buf.obs[t, :, 0] - 1000 * t).long().tolist())
        assert steps == [3, 4, 5, 6, 7]
    assert len(buf) == cap * K


def test_uniform_sampling_covers_all_stored_and_groups_by_task():
    buf = MultiTaskReplayBuffer(50, K, OBS, ACT, seed=1)
    fill(buf, 20)
    b = buf.sample(4000, stratified=False)
    assert b.task_major is False  # even if its rows happened to be in task-major blocks
    assert torch.all(b.task_id[1:] >= b.task_id[:-1])  # sorted by task
    assert torch.equal(b.obs[:, 0] // 1000, b.task_id.float())
    counts = torch.bincount(b.task_id, minlength=K).float()
    assert torch.allclose(counts / 4000, torch.full((K,), 0.25), atol=0.04)
    seen = set(b.obs[:, 0].long().tolist())
    assert seen == {1000 * t + s for t in range(K) for s in range(20)}


def test_sampling_is_reproducible_with_seed_and_differs_across_seeds():
    a, b, c = (MultiTaskReplayBuffer(20, K, OBS, ACT, seed=s) for s in (3, 3, 4))
    for buf in (a, b, c):
        fill(buf, 15)
    assert torch.equal(a.sample(16).obs, b.sample(16).obs)
    assert not torch.equal(a.sample(16).obs, c.sample(16).obs)


def test_dtype_device_and_bad_input():
    buf = MultiTaskReplayBuffer(4, K, OBS, ACT, device="cpu")
    fill(buf, 2)
    b = buf.sample(8)
    assert b.obs.dtype == torch.float32 and b.task_id.dtype == torch.int64
    assert b.obs.device.type == "cpu"
    with pytest.raises(ValueError, match="divisible by the 4 tasks"):
        buf.sample(10)
    with pytest.raises(ValueError, match=r"obs must have shape \(4, 6\)"):
        buf.add(torch.zeros(3, OBS), torch.zeros(K, ACT), torch.zeros(K), torch.zeros(K, OBS),
                torch.zeros(K))
    with pytest.raises(ValueError, match="capacity_per_task must be a positive integer"):
        MultiTaskReplayBuffer(0, K, OBS, ACT)


def test_state_dict_round_trip_restores_contents_and_sampler():
    a = MultiTaskReplayBuffer(6, K, OBS, ACT, seed=7)
    fill(a, 9)
    a.sample(8)
    state = a.state_dict()
    b = MultiTaskReplayBuffer(6, K, OBS, ACT, seed=123)
    b.load_state_dict(state)
    assert torch.equal(a.pos, b.pos) and torch.equal(a.size, b.size)
    assert_same_batch(a.sample(8), b.sample(8))
    # Adding after restore continues the same rings.
    fill(a, 1, start=9)
    fill(b, 1, start=9)
    assert torch.equal(a.obs, b.obs)
    wrong = MultiTaskReplayBuffer(7, K, OBS, ACT)
    with pytest.raises(ValueError, match="capacity 6 per task, this buffer has 7"):
        wrong.load_state_dict(state)
    with pytest.raises(ValueError, match="missing 'generator'"):
        b.load_state_dict({k: v for k, v in state.items() if k != "generator"})


def test_state_dict_saves_only_the_filled_part():
    a = MultiTaskReplayBuffer(1000, K, OBS, ACT, seed=1)
    fill(a, 5)
    state = a.state_dict()
    assert state["obs"].shape == (K, 5, OBS) and state["reward"].shape == (K, 5)
    # ... also on disk: torch.save writes a view's whole storage, so these must be copies
    saved = io.BytesIO()
    torch.save(state, saved)
    assert len(saved.getvalue()) < a.nbytes() / 20  # 5 of 1000 rows (~1% of the ring)
    b = MultiTaskReplayBuffer(1000, K, OBS, ACT, seed=2)
    b.obs.fill_(7.0)  # stale contents beyond the filled part are cleared on load
    b.load_state_dict(state)
    assert torch.equal(a.obs, b.obs) and torch.equal(a.next_obs, b.next_obs)
    assert_same_batch(a.sample(8), b.sample(8))


def test_state_dict_loads_with_weights_only(tmp_path):
    a = MultiTaskReplayBuffer(3, K, OBS, ACT)
    fill(a, 2)
    torch.save(a.state_dict(), tmp_path / "buf.pt")
    state = torch.load(tmp_path / "buf.pt", weights_only=True)
    b = MultiTaskReplayBuffer(3, K, OBS, ACT)
    b.load_state_dict(state)
    assert torch.equal(a.obs, b.obs)


def test_mt10_million_transitions_fit_in_500mb():
    # Storage grows linearly in capacity, so a small buffer gives the exact per-transition size.
    k, obs, act = 10, 49, 4
    small = MultiTaskReplayBuffer(100, k, obs, act)
    per_transition = small.nbytes() / (k * 100)
    assert per_transition == 4 * (2 * obs + act + 2)  # float32 obs, next_obs, action, reward, done
    assert 1_000_000 * per_transition <= 500e6


@pytest.mark.parametrize(("capacity", "steps", "stored"), [
    (10, 1, range(1)),
    (10, 2, range(2)),
    (10, 7, range(7)),
    (5, 8, range(3, 8)),  # wrapped: slots hold steps [5, 6, 7, 3, 4]; step 4 in the last slot
])
def test_stratified_sampling_reaches_every_stored_slot_including_the_newest(capacity, steps,
                                                                            stored):
    """Offsets are floor(u · size) with u in [0, 1): each of the `size` slots has chance
    1/size per draw, so with 400 draws per task and at most 5-7 slots the chance that some
    slot is never drawn is below 7 · (6/7)^400 ≈ 1e-26. Drawing from size - 1 slots (an
    off-by-one) would never return the last slot: the newest transition before the ring
    wraps, and after it wraps the one in slot capacity - 1."""
    buf = MultiTaskReplayBuffer(capacity, K, OBS, ACT, seed=5)
    fill(buf, steps)
    b = buf.sample(400 * K, stratified=True)
    codes = b.obs[:, 0].long().view(K, 400)
    for t in range(K):
        assert set(codes[t].tolist()) == {1000 * t + s for s in stored}, t
