"""A fixed pool of KV blocks: reference counts, per-sequence block tables, and automatic prefix caching.

A full block is identified by a hash chained over (parent block's hash, its token ids). Once computed it is
registered in the cache; when nobody references it any more it stays reusable until evicted, least recently used
first. Only full blocks are ever shared, so a block that is written to always has exactly one owner.

With ``record_events`` the manager also notes what routers learn from vLLM-style KV-cache events: runs of newly
cached blocks (with their parent hash and tokens) and evictions, taken by the engine core after each step.
"""
from collections import OrderedDict, deque
from dataclasses import dataclass

from scheduler.kv_events import BlockRemoved, BlockStored, KVCacheEvent
from scheduler.sequence import Sequence

ROOT_PARENT_HASH = 0  # the first block's parent; not None, whose hash varies between processes before Python 3.12


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full, computed and registered in the prefix cache
    token_ids: tuple[int, ...] = ()  # of a registered block, so a hash hit is confirmed exactly


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    # Python's hash of a tuple of ints does not depend on PYTHONHASHSEED, so hashes are stable across runs.
    return hash((ROOT_PARENT_HASH if parent_hash is None else parent_hash, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 record_events: bool = False) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} blocks of {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free_ids: deque[int] = deque(range(num_blocks))  # unreferenced, holding nothing reusable
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced cached blocks, least recent first
        self._cached: dict[int, int] = {}  # block hash -> block id
        self._events: list[KVCacheEvent] | None = [] if record_events else None

    @property
    def num_free_blocks(self) -> int:
        """Blocks available to new allocations: never used, or cached but referenced by nobody."""
        return len(self._free_ids) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def take_events(self) -> list[KVCacheEvent]:
        """The events recorded since the last call, oldest first (none without ``record_events``)."""
        if not self._events:
            return []
        events, self._events = self._events, []
        return events

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached prefix of ``seq``, leaving at least one token to compute. No side effects."""
        if not self.enable_prefix_caching or seq.needs_prompt_logprobs:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self._extend_hashes(seq, max_blocks)
        matched: list[int] = []
        for i in range(max_blocks):
            block_id = self._cached.get(seq.block_hashes[i])
            if block_id is None or self.blocks[block_id].token_ids != self._block_tokens(seq, i):
                break
            matched.append(block_id)
        return matched

    def can_admit(self, seq: Sequence, prefix: list[int], num_new_tokens: int) -> bool:
        """Whether ``seq`` can take the cached ``prefix`` and then blocks for ``num_new_tokens`` more tokens."""
        num_computed = seq.num_computed_tokens + len(prefix) * self.block_size
        held = len(seq.block_table) + len(prefix)
        needed = self.blocks_for(num_computed + num_new_tokens) - held
        taken_from_evictable = sum(1 for block_id in prefix if self.blocks[block_id].ref_count == 0)
        return needed <= self.num_free_blocks - taken_from_evictable

    def admit(self, seq: Sequence, prefix: list[int]) -> None:
        """Gives ``seq`` (which holds no blocks) the cached ``prefix``; those tokens count as computed."""
        assert not seq.block_table, "admit() is for a sequence without blocks"
        for block_id in prefix:
            self._take_ref(block_id)
        seq.block_table = list(prefix)
        seq.num_computed_tokens = len(prefix) * self.block_size

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Adds blocks so ``seq`` can hold ``num_new_tokens`` more computed tokens; False (and no change) if short."""
        needed = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if needed > self.num_free_blocks:
            return False
        for _ in range(needed):
            seq.block_table.append(self._take_free_block())
        return True

    def fork(self, parent: Sequence, child: Sequence, num_tokens: int) -> None:
        """Shares the full blocks among the first ``num_tokens`` tokens of ``parent`` with ``child`` (no blocks yet)."""
        assert not child.block_table, "fork() is for a child without blocks"
        num_blocks = min(num_tokens, parent.num_computed_tokens) // self.block_size
        for block_id in parent.block_table[:num_blocks]:
            self._take_ref(block_id)
        child.block_table = parent.block_table[:num_blocks]
        child.num_computed_tokens = num_blocks * self.block_size

    def cache_full_blocks(self, seq: Sequence, num_computed_before: int) -> None:
        """Registers the blocks that became full and computed since ``seq`` had ``num_computed_before`` tokens."""
        if not self.enable_prefix_caching:
            return
        first = num_computed_before // self.block_size
        last = seq.num_computed_tokens // self.block_size
        self._extend_hashes(seq, last)
        for i in range(first, last):
            block = self.blocks[seq.block_table[i]]
            block_hash = seq.block_hashes[i]
            if block.hash is None and block_hash not in self._cached:
                block.hash = block_hash
                block.token_ids = self._block_tokens(seq, i)
                self._cached[block_hash] = block.block_id
                if self._events is not None:
                    self._record_stored(seq, i)

    def free(self, seq: Sequence) -> None:
        """Drops ``seq``'s references. Released from the tail, so a prefix outlives its own continuations in the LRU."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is None:
                    self._free_ids.append(block_id)
                else:
                    self._evictable[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0

    def _take_ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._evictable[block_id]
        block.ref_count += 1

    def _take_free_block(self) -> int:
        if self._free_ids:
            block_id = self._free_ids.popleft()
        else:
            block_id, _ = self._evictable.popitem(last=False)
            block = self.blocks[block_id]
            del self._cached[block.hash]
            if self._events is not None:
                self._record_removed(block.hash)
            block.hash = None
            block.token_ids = ()
        self.blocks[block_id].ref_count = 1
        return block_id

    def _block_tokens(self, seq: Sequence, index: int) -> tuple[int, ...]:
        return tuple(seq.token_ids[index * self.block_size : (index + 1) * self.block_size])

    def _extend_hashes(self, seq: Sequence, num_blocks: int) -> None:
        while len(seq.block_hashes) < num_blocks:
            index = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            seq.block_hashes.append(hash_block(parent, self._block_tokens(seq, index)))

    def _record_stored(self, seq: Sequence, index: int) -> None:
        """Extends the last BlockStored when this block continues its chain, else starts a new one."""
        block_hash = seq.block_hashes[index]
        parent = seq.block_hashes[index - 1] if index > 0 else None
        last = self._events[-1] if self._events else None
        if isinstance(last, BlockStored) and parent is not None and last.block_hashes[-1] == parent:
            last.block_hashes.append(block_hash)
            last.token_ids.append(self.blocks[seq.block_table[index]].token_ids)
        else:
            self._events.append(BlockStored([block_hash], parent, [self.blocks[seq.block_table[index]].token_ids]))

    def _record_removed(self, block_hash: int) -> None:
        last = self._events[-1] if self._events else None
        if isinstance(last, BlockRemoved):
            last.block_hashes.append(block_hash)
        else:
            self._events.append(BlockRemoved([block_hash]))
