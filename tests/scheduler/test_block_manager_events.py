"""The block manager's KV-cache event records: stored runs with chained parents and their tokens, evictions."""
import subprocess
import sys

from sched_helpers import make_seq
from scheduler.block_manager import BlockManager, hash_block
from scheduler.kv_events import BlockRemoved, BlockStored

BS = 4


def compute(manager: BlockManager, seq, num_tokens: int | None = None) -> None:
    """Admits ``seq`` if new, then computes ``num_tokens`` more tokens (all by default), as a prefill chunk would."""
    if not seq.block_table:
        manager.admit(seq, manager.match_prefix(seq))
    before = seq.num_computed_tokens
    count = seq.num_tokens - before if num_tokens is None else num_tokens
    assert manager.allocate(seq, count)
    seq.num_computed_tokens = before + count
    manager.cache_full_blocks(seq, before)


def chain(tokens: list[int]) -> list[int]:
    hashes: list[int] = []
    for start in range(0, len(tokens) - len(tokens) % BS, BS):
        hashes.append(hash_block(hashes[-1] if hashes else None, tuple(tokens[start : start + BS])))
    return hashes


def test_a_prefill_stores_its_full_blocks_as_one_chained_run() -> None:
    manager = BlockManager(num_blocks=8, block_size=BS, record_events=True)
    tokens = list(range(100, 114))  # 3 full blocks and 2 tokens
    compute(manager, make_seq(tokens))
    assert manager.take_events() == [BlockStored(chain(tokens), None, [tuple(tokens[0:4]), tuple(tokens[4:8]),
                                                                        tuple(tokens[8:12])])]
    assert manager.take_events() == []


def test_chunks_and_decodes_continue_the_chain_from_the_last_stored_block() -> None:
    manager = BlockManager(num_blocks=8, block_size=BS, record_events=True)
    tokens = list(range(10))
    seq = make_seq(tokens)
    compute(manager, seq, 5)  # one full block
    first = manager.take_events()
    compute(manager, seq)  # the second block fills; two tokens remain partial
    second = manager.take_events()
    hashes = chain(tokens)
    assert first == [BlockStored([hashes[0]], None, [(0, 1, 2, 3)])]
    assert second == [BlockStored([hashes[1]], hashes[0], [(4, 5, 6, 7)])]
    seq.token_ids += [10, 11]  # two decoded tokens fill the third block
    compute(manager, seq)
    assert manager.take_events() == [BlockStored([chain(seq.token_ids)[2]], hashes[1], [(8, 9, 10, 11)])]


def test_a_prefix_hit_stores_only_the_new_blocks_with_the_cached_parent() -> None:
    manager = BlockManager(num_blocks=16, block_size=BS, record_events=True)
    shared = [7, 7, 7, 7, 8, 8, 8, 8]
    compute(manager, make_seq(shared + [1]))
    manager.take_events()
    other = shared + [5, 5, 5, 5, 6]
    compute(manager, make_seq(other))
    hashes = chain(other)
    assert manager.take_events() == [BlockStored([hashes[2]], hashes[1], [(5, 5, 5, 5)])]


def test_a_block_already_cached_by_another_sequence_is_not_stored_twice() -> None:
    manager = BlockManager(num_blocks=16, block_size=BS, record_events=True)
    tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5]
    first, second = make_seq(tokens), make_seq(tokens)
    for seq in (first, second):  # both admitted before either computed: no prefix hit, both compute
        manager.admit(seq, manager.match_prefix(seq))
    compute(manager, first)
    compute(manager, second)
    assert manager.take_events() == [BlockStored(chain(tokens), None, [(3, 1, 4, 1), (5, 9, 2, 6)])]


def test_eviction_removes_the_least_recently_used_hashes() -> None:
    manager = BlockManager(num_blocks=4, block_size=BS, record_events=True)
    old = list(range(9))  # 2 full blocks + 1
    seq = make_seq(old)
    compute(manager, seq)
    manager.free(seq)  # freeing keeps the blocks cached: nothing is removed yet
    assert [type(event) for event in manager.take_events()] == [BlockStored]
    new = make_seq(list(range(50, 63)))  # needs all 4 blocks: both cached ones are evicted
    compute(manager, new)
    events = manager.take_events()
    # Freed from the tail, so the last block goes first; the eviction precedes the new run's store.
    assert events[0] == BlockRemoved(list(reversed(chain(old))))
    assert events[1] == BlockStored(chain(list(range(50, 63))), None, [tuple(range(50 + 4 * i, 54 + 4 * i))
                                                                       for i in range(3)])
    assert len(events) == 2


def test_nothing_is_recorded_unless_asked_or_without_prefix_caching() -> None:
    for manager in (BlockManager(8, BS), BlockManager(8, BS, enable_prefix_caching=False, record_events=True)):
        compute(manager, make_seq(list(range(13))))
        assert manager.take_events() == []


def test_block_hashes_are_the_same_in_every_process() -> None:
    """Routers keep the hashes they were sent: a restarted replica must name the same blocks the same way."""
    code = "from scheduler.block_manager import hash_block; print(hash_block(hash_block(None, (1, 2)), (3, 4)))"
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    assert runs == {f"{hash_block(hash_block(None, (1, 2)), (3, 4))}\n"}
