"""Reuse of prompt prefixes' keys and values across requests (system prompts, few-shot).

Prompts are cut into blocks of `block` tokens. The keys and values of a full block live in a
device pool ([M, K, block, H] per layer, M blocks within a memory budget; an int8 cache's
blocks carry their [M, K, block, 1] scales, copied the same way) under a key that
names the block's tokens AND everything before it: (parent block's uid, this block's tokens).
A new prompt walks its blocks from the start while they are in the pool; the matched blocks
are copied into its slot's cache rows and only the rest of the prompt is prefilled
(`Sampler.extend` from the first unmatched position). After a prompt is prefilled, its full
blocks that are not yet pooled are copied out of the slot.

Tenants are kept apart: the first block of a chain hangs under the request's owner (the API
key's tenant), so `cached_tokens` can never reveal that another key sent a prompt.

The pool is a copy, not shared pages: a slot owns its whole cache row, so eviction never has
to wait for a running request. Eviction is least-recently-used; a lookup refreshes a chain
from its deepest block to its first, so a chain's leaves are evicted before its roots (a
block whose parent was evicted can never match again and simply ages out).

The copies are jitted calls of fixed shape (unused block indices masked), so no prompt length
ever recompiles them: a load covers a slot's whole row; a store reads only the leading cache
segments that hold the prompt's blocks (one variant per segment count, all compiled at
warm-up), so a short prompt's store touches 256 positions, not max_len.
"""

import collections
import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from research.serving.core import kv_cache


def _is_layer(x) -> bool:
    """A layer of a KVCache field: a tuple of segments (empty for a float cache's scales)."""
    return isinstance(x, tuple) and not any(isinstance(a, tuple) for a in x)


@dataclasses.dataclass
class _Block:
    uid: int
    index: int  # Row of the pool.
    key: tuple


class PrefixCache:
    """A pool of prompt blocks and the jitted copies between it and a sampler's slots.

    Args:
      model_config: the model's ModelConfig.
      max_len: S, the sampler's tokens per slot.
      budget_bytes: device memory for the pool; the number of blocks is what fits.
      block: tokens per block.
      kv_dtype: the sampler's KV cache dtype ("auto" or "int8").
      mesh: the sampler's mesh, if any: the pool's kv heads are split as the cache's are.
    """

    def __init__(
        self,
        model_config,
        max_len: int,
        budget_bytes: float,
        block: int = 16,
        *,
        kv_dtype: str = "auto",
        mesh=None,
    ):
        self.block = block
        self.max_len = max_len
        # One slot's cache of `block` positions is one segment per layer: a block's shapes.
        one_block = jax.eval_shape(lambda: kv_cache.init_cache(model_config, 1, block, kv_dtype))
        self.block_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(one_block))
        self.num_blocks = int(budget_bytes // self.block_bytes)
        self.blocks_per_slot = -(-max_len // block)
        self._by_key: dict[tuple, _Block] = {}
        self._lru: collections.OrderedDict[int, _Block] = collections.OrderedDict()
        self._free = list(range(self.num_blocks))[::-1]
        self._next_uid = 1
        self.queried_tokens = 0
        self.hit_tokens = 0
        if self.num_blocks == 0:
            self.pool = None
            return
        # A KVCache whose one segment per layer is [M, K, block, H] (scales: [M, K, block, 1]).
        self.pool = jax.tree.map(
            lambda a: jnp.zeros((self.num_blocks, *a.shape[1:]), a.dtype), one_block
        )
        if mesh is not None:  # Blocks replicated, heads as in the slots' cache.
            cache_spec = kv_cache.cache_sharding(mesh, model_config, 1, max_len).keys[0][0].spec
            pool_spec = jax.sharding.PartitionSpec(None, *tuple(cache_spec)[1:])
            self.pool = jax.device_put(self.pool, jax.sharding.NamedSharding(mesh, pool_spec))
        self._load = jax.jit(self._load_fn, donate_argnums=0)
        self._store = jax.jit(self._store_fn, donate_argnums=0, static_argnames="num_segments")

    @property
    def enabled(self) -> bool:
        return self.pool is not None

    @property
    def used_blocks(self) -> int:
        return len(self._lru)

    # ---- host-side index ---------------------------------------------------------------

    def _blocks(self, tokens: Sequence[int], count: int) -> list[tuple]:
        return [tuple(tokens[i * self.block : (i + 1) * self.block]) for i in range(count)]

    def match(self, prompt: Sequence[int], owner: str = "") -> list[_Block]:
        """The pooled blocks of `owner` that start `prompt`, leaving at least one token to
        prefill."""
        if not self.enabled:
            return []
        chain, parent = [], ("owner", owner)
        for tokens in self._blocks(prompt, (len(prompt) - 1) // self.block):
            found = self._by_key.get((parent, tokens))
            if found is None:
                break
            chain.append(found)
            parent = found.uid
        self._refresh([b.uid for b in chain])
        self.queried_tokens += len(prompt)
        self.hit_tokens += len(chain) * self.block
        return chain

    def _refresh(self, chain_uids: list[int]) -> None:
        for uid in reversed(chain_uids):  # Deepest first: the root ends up most recent.
            self._lru.move_to_end(uid)

    def _allocate(self, protected: set[int]) -> int | None:
        if self._free:
            return self._free.pop()
        for uid, victim in self._lru.items():
            if uid not in protected:
                del self._lru[uid]
                del self._by_key[victim.key]
                return victim.index
        return None

    def plan_store(self, prompt: Sequence[int], owner: str = "") -> list[tuple[int, int]]:
        """Registers the full blocks of `prompt` (under `owner`) that are not pooled yet;
        returns (block number in the prompt, pool index) of those to copy out of the slot."""
        if not self.enabled:
            return []
        copies, chain, parent = [], [], ("owner", owner)
        for number, tokens in enumerate(self._blocks(prompt, len(prompt) // self.block)):
            key = (parent, tokens)
            found = self._by_key.get(key)
            if found is None:
                index = self._allocate(set(chain))
                if index is None:
                    break
                found = _Block(uid=self._next_uid, index=index, key=key)
                self._next_uid += 1
                self._by_key[key] = found
                self._lru[found.uid] = found
                copies.append((number, index))
            chain.append(found.uid)
            parent = found.uid
        self._refresh(chain)
        return copies

    # ---- device copies -----------------------------------------------------------------

    def _load_fn(self, cache, pool, slot, indices_m, num_tokens):
        """cache rows [slot, :, :num_tokens] = the pooled blocks indices_m, in order."""
        s, m, blk = self.max_len, self.blocks_per_slot, self.block

        def load(segments, pool_layer):
            if not segments:
                return ()
            (p_mkbh,) = pool_layer
            _, k, _, h = p_mkbh.shape
            blocks_kmbh = p_mkbh[indices_m].transpose(1, 0, 2, 3)
            row_ksh = blocks_kmbh.reshape(k, m * blk, h)[:, :s]
            out = []
            for c_bksh, (start, end) in zip(segments, kv_cache.segment_bounds(s), strict=True):
                old_1ksh = jax.lax.dynamic_slice_in_dim(c_bksh, slot, 1)
                keep_s = jnp.arange(start, end) < num_tokens
                new_1ksh = jnp.where(
                    keep_s[None, None, :, None], row_ksh[None, :, start:end], old_1ksh
                )
                out.append(jax.lax.dynamic_update_slice_in_dim(c_bksh, new_1ksh, slot, 0))
            return tuple(out)

        return jax.tree.map(load, cache, pool, is_leaf=_is_layer)

    def _store_fn(self, pool, cache, slot, indices_m, *, num_segments):
        """pool[indices_m[i]] = block i of the slot's row (index num_blocks = skip), reading
        only the row's first `num_segments` segments (those that hold the copied blocks)."""
        blk = self.block

        def store(p_mkbh, segments):
            pieces = [jax.lax.dynamic_slice_in_dim(c, slot, 1)[0] for c in segments[:num_segments]]
            row_ksh = jnp.concatenate(pieces, axis=1)  # [K, S', H]
            k, s, h = row_ksh.shape
            m = indices_m.shape[0]
            row_ksh = jnp.pad(row_ksh, ((0, 0), (0, m * blk - s), (0, 0)))
            blocks_mkbh = row_ksh.reshape(k, m, blk, h).transpose(1, 0, 2, 3)
            return p_mkbh.at[indices_m].set(blocks_mkbh, mode="drop")

        def layer(pool_layer, segments):
            return (store(pool_layer[0], segments),) if segments else ()

        return jax.tree.map(layer, pool, cache, is_leaf=_is_layer)

    def _store_shapes(self) -> list[tuple[int, int]]:
        """(segments read, blocks they hold) of every store variant: the row's first 1, 2, ...
        segments, so a short prompt's copy reads its first segment, not the max_len row."""
        ends = [end for _, end in kv_cache.segment_bounds(self.max_len)]
        return [(i + 1, -(-end // self.block)) for i, end in enumerate(ends)]

    def load(self, cache: kv_cache.KVCache, slot: int, chain: list[_Block]) -> kv_cache.KVCache:
        """Copies the matched blocks into `slot`'s rows 0..len(chain)*block (cache donated)."""
        indices_m = np.zeros((self.blocks_per_slot,), np.int32)
        indices_m[: len(chain)] = [b.index for b in chain]
        return self._load(
            cache, self.pool, np.int32(slot), indices_m, np.int32(len(chain) * self.block)
        )

    def store(self, cache: kv_cache.KVCache, slot: int, copies: list[tuple[int, int]]) -> None:
        """Copies the slot's blocks named by `plan_store` into the pool."""
        if not copies:
            return
        last = max(number for number, _ in copies)
        num_segments, num_row_blocks = next(v for v in self._store_shapes() if v[1] > last)
        indices_m = np.full((num_row_blocks,), self.num_blocks, np.int32)
        for block_number, index in copies:
            indices_m[block_number] = index
        self.pool = self._store(
            self.pool, cache, np.int32(slot), indices_m, num_segments=num_segments
        )

    def warm_up(self, cache: kv_cache.KVCache) -> kv_cache.KVCache:
        """Compiles both copies, the store for every segment count (touching nothing: no
        block is loaded or stored)."""
        if not self.enabled:
            return cache
        for num_segments, num_row_blocks in self._store_shapes():
            skip = np.full((num_row_blocks,), self.num_blocks, np.int32)
            self.pool = self._store(self.pool, cache, np.int32(0), skip, num_segments=num_segments)
        indices = np.zeros((self.blocks_per_slot,), np.int32)
        return self._load(cache, self.pool, np.int32(0), indices, np.int32(0))
