"""BlockLoader: rank partition of every epoch, determinism, exact resume (also across epochs), refusals."""

import numpy as np
import pytest
import torch

from ddistill.data.loader import BlockLoader, LoaderStateError

N, L = 23, 5


@pytest.fixture
def blocks():
    # row i is [i, i, ..., i] so a batch tells which blocks it holds
    return np.repeat(np.arange(N, dtype=np.uint16)[:, None], L, axis=1)


def _ids(batch):
    assert batch.dtype == torch.long and batch.shape[1] == L
    return batch[:, 0].tolist()


def test_batches_follow_seeded_permutation(blocks):
    loader = BlockLoader(blocks, micro_batch_size=3, seed=7)
    assert loader.batches_per_epoch == N // 3
    got = [_ids(next(loader)) for _ in range(2 * loader.batches_per_epoch + 1)]
    expected = []
    for epoch in range(3):
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(7 + epoch)).tolist()
        expected += [perm[i:i + 3] for i in range(0, 3 * (N // 3), 3)]
    assert got == expected[: len(got)]
    assert loader.epoch == 2 and loader.position == 1


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_partition_each_epoch(blocks, world_size):
    loaders = [BlockLoader(blocks, micro_batch_size=2, rank=r, world_size=world_size, seed=3)
               for r in range(world_size)]
    per_rank = N // world_size
    for epoch in range(2):
        seen = [sum((_ids(next(ld)) for _ in range(ld.batches_per_epoch)), []) for ld in loaders]
        flat = [i for s in seen for i in s]
        assert len(flat) == len(set(flat))  # disjoint within the epoch
        shards = [ld.epoch_indices(epoch).tolist() for ld in loaders]
        assert sorted(i for s in shards for i in s) == sorted(
            torch.randperm(N, generator=torch.Generator().manual_seed(3 + epoch))[: per_rank * world_size].tolist())
        for s, shard in zip(seen, shards, strict=True):
            assert s == shard[: len(s)]


def test_no_drop_last_covers_everything(blocks):
    loaders = [BlockLoader(blocks, micro_batch_size=4, rank=r, world_size=2, seed=0, drop_last=False)
               for r in range(2)]
    seen = set()
    for ld in loaders:
        sizes = []
        for _ in range(ld.batches_per_epoch):
            ids = _ids(next(ld))
            sizes.append(len(ids))
            seen.update(ids)
        assert sizes == [4, 4, 4]  # 12 = ceil(23 / 2) indices per rank, padded by repetition
    assert seen == set(range(N))


@pytest.mark.parametrize("stop_after", [0, 2, 7, 8, 9])  # 7 = exactly one epoch (23 // 3 batches)
def test_resume_matches_uninterrupted(blocks, stop_after):
    ref = BlockLoader(blocks, micro_batch_size=3, seed=11)
    for _ in range(stop_after):
        next(ref)
    state = ref.state_dict()
    expected = [_ids(next(ref)) for _ in range(10)]  # crosses at least one epoch boundary

    resumed = BlockLoader(blocks, micro_batch_size=3, seed=11)
    resumed.load_state_dict(state)
    assert [_ids(next(resumed)) for _ in range(10)] == expected


def test_resume_two_ranks(blocks):
    def make(rank):
        return BlockLoader(blocks, micro_batch_size=2, rank=rank, world_size=2, seed=5)

    refs = [make(r) for r in range(2)]
    for ld in refs:
        for _ in range(4):
            next(ld)
    states = [ld.state_dict() for ld in refs]
    for r in range(2):
        resumed = make(r)
        resumed.load_state_dict(states[r])
        assert [_ids(next(resumed)) for _ in range(9)] == [_ids(next(refs[r])) for _ in range(9)]


def test_determinism_and_seed_dependence(blocks):
    def first_batches(seed):
        loader = BlockLoader(blocks, micro_batch_size=4, seed=seed)
        return [_ids(next(loader)) for _ in range(6)]

    a, b, c = first_batches(1), first_batches(1), first_batches(2)
    assert a == b and a != c


def test_refuses_foreign_state(blocks):
    state = BlockLoader(blocks, micro_batch_size=2, rank=0, world_size=2, seed=0).state_dict()
    with pytest.raises(LoaderStateError, match="world_size"):
        BlockLoader(blocks, micro_batch_size=2, rank=0, world_size=4, seed=0).load_state_dict(state)
    with pytest.raises(LoaderStateError, match="num_blocks"):
        BlockLoader(blocks[:-1], micro_batch_size=2, rank=0, world_size=2, seed=0).load_state_dict(state)
    with pytest.raises(LoaderStateError, match="seed"):
        BlockLoader(blocks, micro_batch_size=2, rank=0, world_size=2, seed=1).load_state_dict(state)
    with pytest.raises(LoaderStateError, match="out of range"):
        BlockLoader(blocks, micro_batch_size=2, rank=0, world_size=2, seed=0).load_state_dict(
            dict(state, position=100))


def test_argument_errors(blocks):
    with pytest.raises(ValueError, match="rank"):
        BlockLoader(blocks, micro_batch_size=2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="no full micro-batch"):
        BlockLoader(blocks, micro_batch_size=20, world_size=2)


def test_over_token_blocks(tmp_path):
    from ddistill.data.corpora import DataConfig
    from ddistill.data.packing import build_token_blocks

    tb = build_token_blocks(DataConfig(dataset="classics", block_size=64, cache_dir=str(tmp_path)), "validation")
    loader = BlockLoader(tb, micro_batch_size=4, rank=1, world_size=2, seed=0)
    batch = next(loader)
    idx = loader.epoch_indices(0)[:4].numpy()
    assert batch.dtype == torch.long and batch.shape == (4, 64)
    assert torch.equal(batch, torch.from_numpy(tb[np.sort(idx)][np.argsort(np.argsort(idx))]))
