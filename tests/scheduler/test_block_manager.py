"""Block pool: reference counts, prefix caching of full blocks, LRU eviction, forks."""
import pytest

from sched_helpers import make_seq
from scheduler.block_manager import BlockManager

BS = 4


def compute_all(manager: BlockManager, seq) -> None:
    """Admits ``seq`` with its cached prefix and marks every token computed, as a finished prefill would."""
    prefix = manager.match_prefix(seq)
    manager.admit(seq, prefix)
    before = seq.num_computed_tokens
    assert manager.allocate(seq, seq.num_tokens - before)
    seq.num_computed_tokens = seq.num_tokens
    manager.cache_full_blocks(seq, before)


def test_allocate_and_free_return_every_block() -> None:
    manager = BlockManager(num_blocks=8, block_size=BS)
    seq = make_seq(list(range(10)))
    assert manager.allocate(seq, 10)
    assert len(seq.block_table) == 3
    assert manager.usage() == pytest.approx(3 / 8)
    manager.free(seq)
    assert seq.block_table == [] and manager.num_free_blocks == 8 and manager.usage() == 0.0


def test_allocate_refuses_without_partial_change_when_short() -> None:
    manager = BlockManager(num_blocks=2, block_size=BS)
    seq = make_seq(list(range(12)))
    assert not manager.allocate(seq, 12)
    assert seq.block_table == [] and manager.num_free_blocks == 2


def test_prefix_hit_reuses_full_blocks_and_leaves_a_token_to_compute() -> None:
    manager = BlockManager(num_blocks=16, block_size=BS)
    first = make_seq(list(range(14)))  # 3 full blocks + 2 tokens
    compute_all(manager, first)
    assert manager.num_cached_blocks == 3
    same_prefix = make_seq(list(range(12)) + [99, 98, 97])
    matched = manager.match_prefix(same_prefix)
    assert matched == first.block_table[:3]
    manager.admit(same_prefix, matched)
    assert same_prefix.num_computed_tokens == 12
    assert all(manager.blocks[b].ref_count == 2 for b in matched)
    exactly_cached = make_seq(list(range(12)))  # all 3 blocks cached, but the last token must be computed
    assert manager.match_prefix(exactly_cached) == first.block_table[:2]
    other = make_seq([1, 2, 3, 4, 5])
    assert manager.match_prefix(other) == []


def test_hit_requires_the_whole_chain_not_just_equal_blocks() -> None:
    manager = BlockManager(num_blocks=16, block_size=BS)
    compute_all(manager, make_seq([1, 2, 3, 4, 5, 6, 7, 8, 0]))
    # Second block equal, first block different: the chained hash differs, so nothing matches.
    assert manager.match_prefix(make_seq([9, 9, 9, 9, 5, 6, 7, 8, 0])) == []


def test_unreferenced_cached_blocks_count_as_free_and_are_evicted_lru_tail_first() -> None:
    manager = BlockManager(num_blocks=6, block_size=BS)
    old = make_seq(list(range(100, 109)))  # 2 full blocks + 1
    new = make_seq(list(range(200, 209)))
    compute_all(manager, old)
    compute_all(manager, new)
    old_blocks, new_blocks = list(old.block_table), list(new.block_table)
    manager.free(old)
    manager.free(new)
    assert manager.num_free_blocks == 6 and manager.usage() == 0.0 and manager.num_cached_blocks == 4
    # Two never-cached partial blocks go first, then cached ones least recently freed first, a sequence's tail first.
    taker = make_seq(list(range(300, 324)))
    assert manager.allocate(taker, 24)
    assert taker.block_table[:2] == [old_blocks[2], new_blocks[2]]
    assert taker.block_table[2:] == [old_blocks[1], old_blocks[0], new_blocks[1], new_blocks[0]]
    assert manager.num_cached_blocks == 0


def test_a_hit_refreshes_recency() -> None:
    manager = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq([1, 1, 1, 1, 0])
    b = make_seq([2, 2, 2, 2, 0])
    compute_all(manager, a)
    compute_all(manager, b)
    manager.free(a)
    manager.free(b)
    again = make_seq([1, 1, 1, 1, 7])
    compute_all(manager, again)  # touches a's cached block
    manager.free(again)
    assert manager.num_free_blocks == 4
    filler = make_seq(list(range(50, 61)))  # 3 blocks: 2 uncached first, then b's block (older than a's)
    assert manager.allocate(filler, 11)
    assert manager.match_prefix(make_seq([1, 1, 1, 1, 9])) != []
    assert manager.match_prefix(make_seq([2, 2, 2, 2, 9])) == []


def test_can_admit_counts_evictable_prefix_blocks_it_would_take() -> None:
    manager = BlockManager(num_blocks=3, block_size=BS)
    first = make_seq(list(range(9)))
    compute_all(manager, first)
    manager.free(first)  # 2 cached blocks, unreferenced, + 1 free
    seq = make_seq(list(range(8)) + [50, 51, 52, 53, 54])
    prefix = manager.match_prefix(seq)
    assert len(prefix) == 2
    # Taking the two cached blocks leaves one block: room for 4 more tokens, not 5.
    assert manager.can_admit(seq, prefix, 4)
    assert not manager.can_admit(seq, prefix, 5)


def test_fork_shares_full_prompt_blocks() -> None:
    manager = BlockManager(num_blocks=8, block_size=BS)
    parent = make_seq(list(range(10)))
    compute_all(manager, parent)
    child = make_seq(list(range(10)))
    manager.fork(parent, child, parent.num_prompt_tokens - 1)
    assert child.block_table == parent.block_table[:2] and child.num_computed_tokens == 8
    assert manager.blocks[parent.block_table[0]].ref_count == 2
    manager.free(parent)
    assert manager.blocks[child.block_table[0]].ref_count == 1
    manager.free(child)
    assert manager.num_free_blocks == 8


def test_disabled_prefix_caching_never_matches() -> None:
    manager = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    compute_all(manager, make_seq(list(range(9))))
    assert manager.num_cached_blocks == 0
    assert manager.match_prefix(make_seq(list(range(9)))) == []


def test_prompt_logprob_sequences_bypass_the_cache() -> None:
    manager = BlockManager(num_blocks=8, block_size=BS)
    compute_all(manager, make_seq(list(range(9))))
    seq = make_seq(list(range(9)))
    seq.needs_prompt_logprobs = True
    assert manager.match_prefix(seq) == []


def test_same_content_computed_twice_registers_once_and_frees_cleanly() -> None:
    manager = BlockManager(num_blocks=8, block_size=BS)
    a, b = make_seq(list(range(9))), make_seq(list(range(9)))
    for seq in (a, b):
        assert manager.allocate(seq, 9)
    for seq in (a, b):
        seq.num_computed_tokens = 9
        manager.cache_full_blocks(seq, 0)
    assert manager.num_cached_blocks == 2
    manager.free(a)
    manager.free(b)
    assert manager.num_free_blocks == 8 and all(block.ref_count == 0 for block in manager.blocks)
