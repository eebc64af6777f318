"""Which physical KV blocks each sequence owns: the free pool, reference counts, copy-on-write and the
prefix cache (PagedAttention, Kwon et al. 2309.06180; vLLM's automatic prefix caching).

- A sequence's block table lists its physical blocks in logical order; token p lives in block
  ``table[p // block_size]`` at offset ``p % block_size``.
- Blocks are shared by reference count: forked sequences (parallel sampling) share the prompt's
  blocks, and sequences with a common prefix share its full blocks through the prefix cache.
- A full block never changes again. Only a sequence's last, partly filled block is written, and if
  that block is shared it is copied first (copy-on-write).
- A sequence under a KV eviction policy (kv_policy.py) overwrites its own slots, so it needs at most
  budget + one step's tokens' blocks (``policy.capacity`` for a prompt chunk), never shares them and
  never names them.
- Prefix cache: a full block is named by hash(parent block's hash, its tokens), so equal names mean
  equal token prefixes; a sequence under a LoRA adapter starts the chain from its adapter's load identity
  (``Sequence.prefix_salt``), since its K/V differ from the base model's. When nothing references a named block it stays cached ("evictable") and is
  reused on a hit; new allocations take never-named free blocks first, then evict cached ones least
  recently released first.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from loom.engine.sequence import Sequence


class NoFreeBlocksError(RuntimeError):
    pass


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # unreferenced, not in the prefix cache
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced but cached, LRU first
        self._by_hash: dict[int, int] = {}  # block name -> block
        self._hash_of: dict[int, int] = {}  # block -> block name
        self._tokens_of: dict[int, tuple[int, ...]] = {}  # block -> its tokens (guards against hash collisions)
        self.prefix_queries = 0  # full prompt blocks looked up
        self.prefix_hits = 0  # ... and found

    # Accounting -------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take (free + evictable cached)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._hash_of)

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """New blocks (including a copy-on-write copy) to compute ``num_new_tokens`` more tokens."""
        total = -(-self._tokens_held(seq, num_new_tokens) // self.block_size)
        cow = 1 if self._needs_copy(seq) else 0
        return max(0, total - len(seq.block_table)) + cow

    @staticmethod
    def _tokens_held(seq: Sequence, num_new_tokens: int) -> int:
        """Slots the sequence needs for a step: all its tokens, or under a KV policy at most the kept
        ones (<= budget) plus the step's new ones (a table never shrinks, so this is a running max)."""
        tokens = seq.num_computed + num_new_tokens
        return tokens if seq.eviction is None else min(tokens, seq.eviction.policy.budget + num_new_tokens)

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    # Allocation -------------------------------------------------------------------------------

    def _take(self) -> int:
        if self._free:
            block = self._free.popleft()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            self._forget(block)
        else:
            raise NoFreeBlocksError("no free KV blocks")
        self.ref_count[block] = 1
        return block

    def _forget(self, block: int) -> None:
        del self._by_hash[self._hash_of.pop(block)]
        del self._tokens_of[block]

    def _release(self, block: int) -> None:
        self.ref_count[block] -= 1
        assert self.ref_count[block] >= 0, f"block {block} released more often than taken"
        if self.ref_count[block] == 0:
            if block in self._hash_of:
                self._evictable[block] = None
            else:
                self._free.append(block)

    def _needs_copy(self, seq: Sequence) -> bool:
        # The next token goes into the last block when it is partly filled; shared, it must be copied.
        return (seq.num_computed % self.block_size != 0 and bool(seq.block_table)
                and self.ref_count[seq.block_table[-1]] > 1)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]]:
        """Make room for ``num_new_tokens`` more tokens of ``seq``. Returns (src, dst) block copies the
        cache must perform before the step (copy-on-write of a shared last block)."""
        if not self.can_allocate(seq, num_new_tokens):
            raise NoFreeBlocksError(f"sequence {seq.seq_id} needs {self.blocks_needed(seq, num_new_tokens)} "
                                    f"blocks, {self.num_free_blocks} free")
        copies = []
        if self._needs_copy(seq):
            old, new = seq.block_table[-1], self._take()
            copies.append((old, new))
            self._release(old)
            seq.block_table[-1] = new
        total = -(-self._tokens_held(seq, num_new_tokens) // self.block_size)
        while len(seq.block_table) < total:
            seq.block_table.append(self._take())
        return copies

    def free(self, seq: Sequence) -> None:
        # Tail first: the blocks deepest in a prefix are the least likely to be shared again, so they
        # enter the eviction queue first.
        for block in reversed(seq.block_table):
            self._release(block)
        seq.block_table = []
        seq.block_hashes = []

    def trim(self, seq: Sequence) -> None:
        """Give back the blocks past those holding ``seq.num_computed`` tokens (speculative decoding's
        rollback: slots reserved for drafts the target rejected)."""
        keep = -(-seq.num_computed // self.block_size)
        for block in reversed(seq.block_table[keep:]):
            self._release(block)
        del seq.block_table[keep:]
        del seq.block_hashes[seq.num_computed // self.block_size:]

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """``child`` shares all of ``parent``'s blocks (parallel sampling)."""
        for block in parent.block_table:
            self.ref_count[block] += 1
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed = parent.num_computed

    # Prefix cache -----------------------------------------------------------------------------

    @staticmethod
    def _chain(parent: int | tuple[str, int] | None, tokens: tuple[int, ...]) -> int:
        return hash((parent, tokens))

    def match_prefix(self, seq: Sequence) -> int:
        """Point a new (blockless) sequence at cached blocks holding its longest cached prefix of full
        blocks; returns the number of tokens whose K/V it thereby has. At least one token is always
        left to compute, since the last one's logits are needed."""
        assert not seq.block_table and seq.num_computed == 0
        if not self.enable_prefix_caching or seq.eviction is not None:
            return 0
        bs = self.block_size
        parent: int | tuple[str, int] | None = seq.prefix_salt
        for i in range((seq.num_tokens - 1) // bs):  # never the block holding the last token
            tokens = tuple(seq.tokens[i * bs:(i + 1) * bs])
            name = self._chain(parent, tokens)
            if i * bs < seq.prompt_len:
                self.prefix_queries += 1
            block = self._by_hash.get(name)
            if block is None or self._tokens_of[block] != tokens:
                break
            if i * bs < seq.prompt_len:
                self.prefix_hits += 1
            if self.ref_count[block] == 0:
                del self._evictable[block]
            self.ref_count[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(name)
            parent = name
        seq.num_computed = len(seq.block_table) * bs
        return seq.num_computed

    def register_computed(self, seq: Sequence) -> None:
        """Name the blocks of ``seq`` that became full and computed, so later sequences can reuse them."""
        if not self.enable_prefix_caching or seq.eviction is not None:
            return
        bs = self.block_size
        while len(seq.block_hashes) < seq.num_computed // bs:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else seq.prefix_salt
            tokens = tuple(seq.tokens[i * bs:(i + 1) * bs])
            name = self._chain(parent, tokens)
            seq.block_hashes.append(name)
            block = seq.block_table[i]
            if name not in self._by_hash and block not in self._hash_of:
                self._by_hash[name] = block
                self._hash_of[block] = name
                self._tokens_of[block] = tokens

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that no sequence uses (they become plain free blocks)."""
        for block in list(self._evictable):
            self._forget(block)
            self._free.append(block)
        self._evictable.clear()

    def check_invariants(self, live: list[Sequence]) -> None:
        """Refcounts equal the number of live tables holding each block; free/evictable/used partition the
        pool. Used by tests after every step."""
        expected = [0] * self.num_blocks
        for seq in live:
            for block in seq.block_table:
                expected[block] += 1
        assert expected == self.ref_count, "reference counts disagree with block tables"
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free) and not free & evictable, "a block is listed twice"
        assert all(self.ref_count[b] == 0 for b in free | evictable), "a referenced block is listed as free"
        assert all(b in self._hash_of for b in evictable), "an evictable block has no name"
        assert len(free) + len(evictable) + sum(1 for r in self.ref_count if r > 0) == self.num_blocks
        assert all(self._by_hash[h] == b for b, h in self._hash_of.items()), "prefix index out of sync"
