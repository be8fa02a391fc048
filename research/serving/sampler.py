"""The jitted sampler shared by evaluation, `launch.sample` and the server.

A fixed number of slots decode together. A request enters in two jitted calls and then
advances with every other live slot:

    sampler = Sampler(model_config, graphdef, params, num_slots=8)
    state = sampler.init_state()
    prefix = sampler.prefill([prompt_ids])                  # bucketed length, one compile each
    state = sampler.insert(state, prefix, 0, slot=3, request=SamplingParams(...))
    state, steps = sampler.generate(state)                 # steps_per_call tokens per live slot
    state = sampler.release(state, slot=3)                 # e.g. a stop string was seen

Each slot keeps the logits of its next token. A decode step chooses a token from them for
every live slot, then feeds the chosen tokens through the model (one KV-cache step) to get
the next logits; insert only copies a prefill's cache and last logits into the slot, so
token choice is compiled once, inside `generate`. `generate` runs `lax.while_loop` over
steps (stopping early once no slot is live), so there is no Python per token; the first
token of a new request comes from the next `generate` call (`num_steps=1` for a fast first
token, without recompiling). Every slot carries its own SamplingParams as array rows, and
each slot's random draws come from (its seed, its token index) only: the same request gives
the same tokens whatever the other slots are doing. `Sampler.complete` (complete.py) is the
simple high-level loop over many requests (admit into free slots, generate, detokenize,
stop).

Capacity: a slot holds `max_len` tokens (prompt + generated); a prompt may use max_len - 1.
Under a mesh, the cache's kv heads are split over "tensor" and slots over the batch axes;
parameters keep (or get) the shardings their logical axes imply.
"""

import contextlib
from collections.abc import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research import sharding
from research.errors import UserError
from research.serving import complete as complete_lib
from research.serving import kv_cache
from research.serving.complete import Completion
from research.serving.sampling import SamplingParams, SlotParams, choose_tokens, slot_params

_MIN_BUCKET = 16


@flax.struct.dataclass
class DecodeState:
    """Everything about the slots that lives on device. [B] = one row per slot."""

    cache: kv_cache.KVCache
    logits: jax.Array  # [B, V] float32: the model's logits for each slot's next token.
    lengths: jax.Array  # [B] int32: tokens in the cache = position of the next fed token.
    num_generated: jax.Array  # [B] int32: tokens chosen so far for the slot's request.
    live: jax.Array  # [B] bool: still generating.
    output_counts: jax.Array  # [B, V] int32: generated-token counts (presence / frequency).
    seen: jax.Array  # [B, V] bool: prompt or generated tokens (repetition penalty).
    params: SlotParams
    # [B] int32: a token already chosen (and reported) by `activate` but not yet fed through
    # the model; the next decode step feeds it instead of choosing. -1 = none.
    pending: jax.Array


@flax.struct.dataclass
class Prefix:
    """A prefilled batch of P prompts, ready to insert into slots."""

    cache: kv_cache.KVCache  # [P, K, T, H] per layer (T = the length bucket).
    logits: jax.Array  # [P, V] float32 at each prompt's last token.
    lengths: jax.Array  # [P] int32 prompt lengths.
    seen: jax.Array  # [P, V] bool prompt tokens.


@flax.struct.dataclass
class Tokens:
    """What one `generate` call chose: [B, k] for k = steps_per_call; token -1 = none (a
    finished slot, or the step that fed a slot's pending first token: skip, do not stop)."""

    tokens: jax.Array  # int32
    logprobs: jax.Array  # float32, raw model log-probability of the token.
    top_ids: jax.Array  # int32 [B, k, N] the N most likely tokens (num_top_logprobs).
    top_logprobs: jax.Array  # float32 [B, k, N]
    live: jax.Array  # bool [B]: the slot goes on after this call.


def shard_params(params, mesh):
    """Places an nnx.State of parameters on `mesh` by their logical axes (sharding.RULES)."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.RULES):
        shardings = sharding.fit_shardings(nnx.get_named_sharding(params, mesh), params)
    return jax.device_put(params, shardings)


def length_buckets(max_len: int) -> tuple[int, ...]:
    """Prompt lengths prefill compiles for: powers of two from 16, then max_len."""
    buckets, size = [], _MIN_BUCKET
    while size < max_len:
        buckets.append(size)
        size *= 2
    return (*buckets, max_len)


class Sampler:
    """Fixed slots over one model; see the module docstring.

    Args:
      model_config: the Decoder's ModelConfig.
      graphdef, params: `nnx.split(model, nnx.Param)` of a Decoder.
      num_slots: B, requests decoded together.
      max_len: S, tokens per slot (prompt + generated); default model_config.max_seq_len.
      steps_per_call: decode steps per `generate` call.
      num_top_logprobs: N alternatives reported per token (0 = none).
      max_stop_tokens: stop token ids a request may give.
      mesh: a (data, fsdp, tensor) mesh to run on; None = the default device.
    """

    def __init__(
        self,
        model_config,
        graphdef,
        params,
        *,
        num_slots: int = 8,
        max_len: int = 0,
        steps_per_call: int = 16,
        num_top_logprobs: int = 0,
        max_stop_tokens: int = 8,
        mesh=None,
    ):
        max_len = max_len or model_config.max_seq_len
        if not 2 <= max_len <= model_config.max_seq_len:
            raise UserError(
                f"sampler max_len={max_len} must be in [2, model.max_seq_len="
                f"{model_config.max_seq_len}]; lower it."
            )
        for name, value in (("num_slots", num_slots), ("steps_per_call", steps_per_call)):
            if value < 1:
                raise UserError(f"sampler {name}={value} must be >= 1.")
        self.model_config = model_config
        self.graphdef = graphdef
        self.num_slots, self.max_len, self.steps_per_call = num_slots, max_len, steps_per_call
        self.num_top_logprobs, self.max_stop_tokens = num_top_logprobs, max_stop_tokens
        self.mesh = mesh
        self.params = shard_params(params, mesh) if mesh is not None else params
        self.buckets = length_buckets(max_len)
        shardings = self._state_shardings() if mesh is not None else None
        self._init = jax.jit(self._init_state, out_shardings=shardings)
        self._prefill = jax.jit(self._prefill_fn)
        self._insert = jax.jit(self._insert_fn, donate_argnums=0, out_shardings=shardings)
        self._generate = jax.jit(
            self._generate_fn,
            donate_argnums=1,
            out_shardings=None if mesh is None else (shardings, None),
        )
        self._release = jax.jit(self._release_fn, donate_argnums=0, out_shardings=shardings)
        self._extend = jax.jit(
            self._extend_fn,
            donate_argnums=1,
            static_argnames="num_prompt_top",
            out_shardings=None if mesh is None else (shardings, None),
        )
        self._activate = jax.jit(
            self._activate_fn,
            donate_argnums=0,
            out_shardings=None if mesh is None else (shardings, None),
        )

    # ---- the jitted pieces -------------------------------------------------------------

    def _context(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _init_state(self) -> DecodeState:
        b, v = self.num_slots, self.model_config.vocab_size
        empty = SamplingParams(max_new_tokens=1, temperature=0.0)
        return DecodeState(
            cache=kv_cache.init_cache(self.model_config, b, self.max_len),
            logits=jnp.zeros((b, v), jnp.float32),
            lengths=jnp.zeros((b,), jnp.int32),
            num_generated=jnp.zeros((b,), jnp.int32),
            live=jnp.zeros((b,), bool),
            output_counts=jnp.zeros((b, v), jnp.int32),
            seen=jnp.zeros((b, v), bool),
            params=jax.tree.map(jnp.asarray, slot_params([empty] * b, self.max_stop_tokens)),
            pending=jnp.full((b,), -1, jnp.int32),
        )

    def _state_shardings(self) -> DecodeState:
        abstract = jax.eval_shape(self._init_state)
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        shardings = jax.tree.map(lambda _: replicated, abstract)
        cache = kv_cache.cache_sharding(self.mesh, self.model_config, self.num_slots, self.max_len)
        return shardings.replace(cache=cache)

    def _prefill_fn(self, params, tokens_pt, lengths_p) -> Prefix:
        model = nnx.merge(self.graphdef, params)
        logits_pv, cache = kv_cache.prefill(model, tokens_pt, lengths_p - 1)
        v = self.model_config.vocab_size
        t = tokens_pt.shape[1]
        in_prompt_pt = jnp.arange(t)[None] < lengths_p[:, None]
        seen_pv = jnp.zeros((tokens_pt.shape[0], v), bool)
        rows_pt = jnp.broadcast_to(jnp.arange(tokens_pt.shape[0])[:, None], tokens_pt.shape)
        seen_pv = seen_pv.at[rows_pt, tokens_pt].max(in_prompt_pt)
        return Prefix(cache=cache, logits=logits_pv, lengths=lengths_p, seen=seen_pv)

    def _insert_fn(self, state: DecodeState, prefix: Prefix, row, slot, request: SlotParams):
        def put(buffer, value):  # value: [1, ...] into buffer[slot].
            start = (slot,) + (0,) * (buffer.ndim - 1)
            return jax.lax.dynamic_update_slice(buffer, value.astype(buffer.dtype), start)

        def take(array):
            return jax.lax.dynamic_slice_in_dim(array, row, 1)

        seen_1v = take(prefix.seen)
        return DecodeState(
            cache=jax.tree.map(lambda c, p: put(c, take(p)), state.cache, prefix.cache),
            logits=put(state.logits, take(prefix.logits)),
            lengths=put(state.lengths, take(prefix.lengths)),
            num_generated=put(state.num_generated, jnp.zeros((1,), jnp.int32)),
            live=put(state.live, jnp.ones((1,), bool)),
            output_counts=put(state.output_counts, jnp.zeros(seen_1v.shape, jnp.int32)),
            seen=put(state.seen, seen_1v),
            params=jax.tree.map(put, state.params, request),
            pending=put(state.pending, jnp.full((1,), -1, jnp.int32)),
        )

    def _generate_fn(self, params, state: DecodeState, num_steps):
        model = nnx.merge(self.graphdef, params)
        b, k, n = self.num_slots, self.steps_per_call, self.num_top_logprobs
        out = Tokens(
            tokens=jnp.full((b, k), -1, jnp.int32),
            logprobs=jnp.zeros((b, k), jnp.float32),
            top_ids=jnp.zeros((b, k, n), jnp.int32),
            top_logprobs=jnp.zeros((b, k, n), jnp.float32),
            live=state.live,
        )
        rows_b = jnp.arange(b)

        def step(carry):
            index, state, out = carry
            live_b = state.live
            chosen_b, logprobs_b, top_ids_bn, top_logprobs_bn = choose_tokens(
                state.logits,
                state.params,
                state.output_counts,
                state.seen,
                state.num_generated,
                n,
            )
            # A pending token (chosen by `activate`) is fed now; it was reported there.
            has_pending_b = state.pending >= 0
            tokens_b = jnp.where(has_pending_b, state.pending, chosen_b)
            new_b = live_b & ~has_pending_b
            num_generated_b = state.num_generated + new_b
            # The chosen token makes lengths + 1 tokens; feeding it needs a free cache row.
            done_b = new_b & self._done(tokens_b, num_generated_b, state.lengths, state.params)
            continues_b = live_b & ~done_b
            # Every slot computes (fixed shapes); finished ones write only their own row.
            positions_b = jnp.minimum(state.lengths, self.max_len - 1)
            logits_bv, cache = kv_cache.decode_step(model, tokens_b, positions_b, state.cache)
            state = DecodeState(
                cache=cache,
                logits=logits_bv,
                lengths=state.lengths + continues_b,
                num_generated=num_generated_b,
                live=continues_b,
                output_counts=state.output_counts.at[rows_b, tokens_b].add(new_b),
                seen=state.seen.at[rows_b, tokens_b].max(new_b),
                params=state.params,
                pending=jnp.full_like(state.pending, -1),
            )
            out = Tokens(
                tokens=out.tokens.at[:, index].set(jnp.where(new_b, tokens_b, -1)),
                logprobs=out.logprobs.at[:, index].set(logprobs_b),
                top_ids=out.top_ids.at[:, index].set(top_ids_bn),
                top_logprobs=out.top_logprobs.at[:, index].set(top_logprobs_bn),
                live=continues_b,
            )
            return index + 1, state, out

        def cond(carry):
            index, state, _ = carry
            return (index < num_steps) & jnp.any(state.live)

        _, state, out = jax.lax.while_loop(cond, step, (jnp.int32(0), state, out))
        return state, out.replace(live=state.live)

    def _done(self, tokens_b, num_generated_b, lengths_b, params: SlotParams):
        """Whether a just-chosen token ends its slot: a stop token, max_new_tokens, or no
        cache row left to feed it."""
        is_stop_b = jnp.any(tokens_b[:, None] == params.stop_token_ids, axis=-1)
        return (
            is_stop_b | (num_generated_b >= params.max_new_tokens) | (lengths_b + 1 >= self.max_len)
        )

    def _release_fn(self, state: DecodeState, slot):
        return state.replace(
            live=state.live.at[slot].set(False), pending=state.pending.at[slot].set(-1)
        )

    def _extend_fn(self, params, state, tokens_rt, slots_r, starts_r, num_real_r, next_rt,
                   num_prompt_top):  # fmt: skip
        """R rows of prompt tokens into their slots (see `extend_rows`); rows with a slot
        >= num_slots are padding. With num_prompt_top, also every position's scores."""
        model = nnx.merge(self.graphdef, params)
        valid_r = slots_r < self.num_slots
        rows_r = jnp.where(valid_r, slots_r, 0)

        def take(array):  # rows_r is in range: no bounds checks, as fast as a dynamic slice.
            return array.at[rows_r].get(mode="promise_in_bounds")

        cache_rows = jax.tree.map(take, state.cache)
        starts_r = jnp.where(valid_r, starts_r, self.max_len)  # Padding writes nothing.
        x_rtd, cache_rows = kv_cache.extend(model, tokens_rt, starts_r, cache_rows)
        last_r11 = jnp.maximum(num_real_r - 1, 0)[:, None, None]
        logits_rv = model.unembed(jnp.take_along_axis(x_rtd, last_r11, axis=1))[:, 0]

        def put(array, rows):  # Padding rows (slot out of range) are dropped.
            return array.at[slots_r].set(rows.astype(array.dtype), mode="drop")

        state = state.replace(
            cache=jax.tree.map(put, state.cache, cache_rows),
            logits=put(state.logits, logits_rv.astype(jnp.float32)),
        )
        if num_prompt_top is None:
            return state, None
        logprobs_rtv = jax.nn.log_softmax(model.unembed(x_rtd).astype(jnp.float32), axis=-1)
        chosen_rt = jnp.take_along_axis(logprobs_rtv, next_rt[..., None], axis=-1)[..., 0]
        top_logprobs_rtn, top_ids_rtn = jax.lax.top_k(logprobs_rtv, max(num_prompt_top, 1))
        return state, (chosen_rt, top_ids_rtn, top_logprobs_rtn)

    def _activate_fn(self, state: DecodeState, slot, prompt_s, length, request: SlotParams):
        """Makes `slot` live and chooses its first token from the prompt's last logits (what
        the first decode step would choose), so it can be streamed before any decode step."""

        def put(buffer, value):  # value: [1, ...] into buffer[slot].
            start = (slot,) + (0,) * (buffer.ndim - 1)
            return jax.lax.dynamic_update_slice(buffer, value.astype(buffer.dtype), start)

        v = self.model_config.vocab_size
        in_prompt_s = jnp.arange(prompt_s.shape[0]) < length
        seen_1v = jnp.zeros((1, v), bool).at[0, prompt_s].max(in_prompt_s)
        counts_1v = jnp.zeros((1, v), jnp.int32)
        logits_1v = jax.lax.dynamic_slice_in_dim(state.logits, slot, 1)
        request = jax.tree.map(jnp.asarray, request)
        token_1, logprob_1, top_ids_1n, top_logprobs_1n = choose_tokens(
            logits_1v, request, counts_1v, seen_1v, jnp.zeros((1,), jnp.int32),
            self.num_top_logprobs,
        )  # fmt: skip
        one_1 = jnp.ones((1,), jnp.int32)
        done_1 = self._done(token_1, one_1, length[None], request)
        state = state.replace(
            lengths=put(state.lengths, length[None]),
            num_generated=put(state.num_generated, one_1),
            live=put(state.live, ~done_1),
            output_counts=put(state.output_counts, counts_1v.at[0, token_1[0]].add(1)),
            seen=put(state.seen, seen_1v.at[0, token_1[0]].set(True)),
            params=jax.tree.map(put, state.params, request),
            pending=put(state.pending, jnp.where(done_1, -1, token_1)),
        )
        first = Tokens(
            tokens=token_1[:, None],
            logprobs=logprob_1[:, None],
            top_ids=top_ids_1n[:, None],
            top_logprobs=top_logprobs_1n[:, None],
            live=~done_1,
        )
        return state, first

    # ---- the public calls ---------------------------------------------------------------

    def set_params(self, params) -> None:
        """Swaps in new parameters of the same shapes (e.g. during training); no recompile."""
        self.params = shard_params(params, self.mesh) if self.mesh is not None else params

    def init_state(self) -> DecodeState:
        """Empty slots (nothing live) with a zero cache, sharded on the mesh if any."""
        with self._context():
            return self._init()

    def check_prompt(self, prompt_ids: Sequence[int]) -> None:
        """UserError for an empty prompt, a prompt that leaves no room, or unknown ids."""
        if len(prompt_ids) == 0:
            raise UserError(
                "the prompt is empty; give at least one token (text prompts get the bos token)."
            )
        if len(prompt_ids) >= self.max_len:
            raise UserError(
                f"the prompt has {len(prompt_ids)} tokens but the context holds {self.max_len} "
                f"(prompt + at least one new token); shorten the prompt to at most "
                f"{self.max_len - 1} tokens."
            )
        ids = np.asarray(prompt_ids)
        if ids.min() < 0 or ids.max() >= self.model_config.vocab_size:
            raise UserError(
                f"the prompt has token ids outside [0, {self.model_config.vocab_size}) "
                "(the model's vocabulary)."
            )

    def check_request(self, request: SamplingParams) -> None:
        request.check(
            vocab_size=self.model_config.vocab_size,
            max_stop_tokens=self.max_stop_tokens,
            max_logprobs=self.num_top_logprobs,
        )

    def prefill(self, prompts: Sequence[Sequence[int]]) -> Prefix:
        """Runs P prompts through the model, padded to one length bucket (jitted per bucket)."""
        if not prompts:
            raise UserError("prefill needs at least one prompt.")
        for prompt in prompts:
            self.check_prompt(prompt)
        longest = max(len(p) for p in prompts)
        bucket = next(b for b in self.buckets if b >= longest)
        tokens_pt = np.zeros((len(prompts), bucket), np.int32)
        for row, prompt in enumerate(prompts):
            tokens_pt[row, : len(prompt)] = prompt
        lengths_p = np.asarray([len(p) for p in prompts], np.int32)
        with self._context():
            return self._prefill(self.params, tokens_pt, lengths_p)

    def insert(
        self, state: DecodeState, prefix: Prefix, row: int, slot: int, request: SamplingParams
    ) -> DecodeState:
        """Puts prefilled prompt `row` into `slot` with its settings; the slot is live, and
        its first token comes from the next `generate`. The old state is donated."""
        self.check_request(request)
        if not 0 <= slot < self.num_slots:
            raise UserError(f"slot {slot} is not in [0, {self.num_slots}).")
        row_params = slot_params([request], self.max_stop_tokens)
        with self._context():
            return self._insert(state, prefix, np.int32(row), np.int32(slot), row_params)

    def generate(self, state: DecodeState, num_steps: int = 0) -> tuple[DecodeState, Tokens]:
        """Up to num_steps (default and at most steps_per_call) tokens for every live slot in
        one jitted call (any num_steps, one compilation). Returns the new state (the old one
        is donated) and Tokens of [B, steps_per_call]."""
        num_steps = num_steps or self.steps_per_call
        if not 1 <= num_steps <= self.steps_per_call:
            raise UserError(f"num_steps={num_steps} must be in [1, {self.steps_per_call}].")
        with self._context():
            return self._generate(self.params, state, np.int32(num_steps))

    def release(self, state: DecodeState, slot: int) -> DecodeState:
        """Stops `slot` (its tokens after this are not generated); the slot is then free."""
        with self._context():
            return self._release(state, np.int32(slot))

    def extend(
        self,
        state: DecodeState,
        slot: int,
        tokens: Sequence[int],
        start: int,
        *,
        bucket: int = 0,
        next_tokens: Sequence[int] | None = None,
        num_prompt_top: int | None = None,
    ) -> tuple[DecodeState, tuple | None]:
        """Prefills `tokens` into `slot` at positions start.. (chunked prefill, or the rest
        of a prompt after cached prefix blocks), leaving the slot's next-token logits at the
        last one. The slot is not live until `activate`. The old state is donated.

        Args:
          bucket: the padded chunk length to compile for (default: the smallest power of two
            from 16 that holds the tokens).
          next_tokens, num_prompt_top: for prompt log-probabilities (echo): the token after
            each of `tokens`, and how many alternatives to rank. Then the second result is
            (logprob of each next token [T], top ids [T, N], top logprobs [T, N]) on device,
            padded to the bucket; otherwise None.
        """
        state, scores = self._extend_call(
            "extend", state, [(slot, tokens, start)], 1, bucket, next_tokens, num_prompt_top
        )
        return state, None if scores is None else tuple(a[0] for a in scores)

    def extend_rows(
        self,
        state: DecodeState,
        rows: Sequence[tuple[int, Sequence[int], int]],
        *,
        num_rows: int = 0,
        bucket: int = 0,
    ) -> DecodeState:
        """`extend` of several slots in one call: rows of (slot, tokens, start), distinct slots.

        One [R, T] forward reads the weights once for all rows, so prompts that wait together
        prefill faster than one call each (ref_small, 4 prompts of 64 tokens: 11.9 ms a
        prompt against 15.6). `num_rows` (default: len(rows)) pads R to a compiled size;
        `bucket` pads T as in `extend`. The old state is donated.
        """
        num_rows = num_rows or len(rows)
        return self._extend_call("extend_rows", state, rows, num_rows, bucket, None, None)[0]

    def _extend_call(self, name, state, rows, num_rows, bucket, next_tokens, num_prompt_top):
        """Pads rows of (slot, tokens, start) to [num_rows, bucket] arrays for `_extend_fn`."""
        slots = [slot for slot, _, _ in rows]
        if not 1 <= len(rows) <= num_rows or len(set(slots)) != len(slots):
            raise UserError(f"{name}: {len(rows)} rows for {num_rows}, slots {slots}.")
        for slot, tokens, start in rows:
            if not tokens or start + len(tokens) > self.max_len or not 0 <= slot < self.num_slots:
                raise UserError(
                    f"{name}: {len(tokens)} tokens at {start} of slot {slot} do not fit "
                    f"{self.num_slots} slots of {self.max_len}."
                )
        longest = max(len(tokens) for _, tokens, _ in rows)
        bucket = bucket or next(b for b in length_buckets(self.max_len) if b >= longest)
        tokens_rt = np.zeros((num_rows, bucket), np.int32)
        next_rt = np.zeros((num_rows, bucket), np.int32)
        slots_r = np.full((num_rows,), self.num_slots, np.int32)  # Padding: out of range.
        starts_r = np.zeros((num_rows,), np.int32)
        num_real_r = np.ones((num_rows,), np.int32)
        for r, (slot, tokens, start) in enumerate(rows):
            tokens_rt[r, : len(tokens)] = tokens
            slots_r[r], starts_r[r], num_real_r[r] = slot, start, len(tokens)
        if next_tokens is not None:
            next_rt[0, : len(next_tokens)] = next_tokens
        with self._context():
            return self._extend(
                self.params,
                state,
                tokens_rt,
                slots_r,
                starts_r,
                num_real_r,
                next_rt,
                num_prompt_top=num_prompt_top,
            )

    def activate(
        self, state: DecodeState, slot: int, prompt_ids: Sequence[int], request: SamplingParams
    ) -> tuple[DecodeState, Tokens]:
        """Makes `slot` live once its whole prompt is in the cache (`extend`) and chooses its
        first token at once (Tokens of [1, 1]: stream it now; `live` False = the request
        already ended: a stop token, max_new_tokens=1 or a full slot). Later tokens come from
        `generate`. The old state is donated."""
        self.check_request(request)
        prompt_s = np.zeros((self.max_len,), np.int32)
        prompt_s[: len(prompt_ids)] = prompt_ids
        row_params = slot_params([request], self.max_stop_tokens)
        with self._context():
            return self._activate(
                state, np.int32(slot), prompt_s, np.int32(len(prompt_ids)), row_params
            )

    def complete(self, prompts, requests, **options) -> list[Completion]:
        """Runs every prompt to completion on these slots: `complete.complete(self, ...)`,
        whose options (tokenizer, on_text, on_done) it takes."""
        return complete_lib.complete(self, prompts, requests, **options)
