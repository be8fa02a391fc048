"""The jitted sampler: fixed slots over one model, shared by evaluation, `launch.sample`
and the server.

A fixed number of slots decode together. A prompt enters a slot one way, in two calls, and
then advances with every other live slot:

    sampler = Sampler(model_config, graphdef, params, num_slots=8)
    state = sampler.init_state()
    state, _ = sampler.extend(state, [(3, prompt_ids, 0)])      # prompt -> slot 3's cache
    state, first = sampler.activate(state, 3, prompt_ids, SamplingParams(...))
    state, steps = sampler.generate(state, num_rows=4, num_keys=len(prompt_ids) + 16)
    state = sampler.release(state, 3)                          # e.g. a stop string was seen

`extend` writes prompt tokens into slots' caches (whole prompts, chunks of long ones, several
slots in one call, or the rest of a prompt after cached prefix blocks) and leaves each slot's
next-token logits. `activate` makes the slot live and chooses its first token at once (so it
can be streamed before any decode step). `generate` runs up to `steps_per_call` decode steps
for every live slot in one `lax.while_loop`, no Python per token. Each step chooses a token
from each slot's logits, then feeds it through the model (one KV-cache step).

Work follows what is in use: `generate` runs on the first R slots and reads the first L
cache positions, for the smallest compiled (R, L) bucket that holds the live slots
(`num_rows` = the highest live slot + 1) and their lengths (`num_keys` >= each live slot's
length + the steps of the call). Buckets: R in powers of two up to num_slots, L in 256 x
powers of four up to max_len. Any bucket at least that large gives the same tokens (up to
float rounding between batch sizes), so `compile_bucket` may run ahead of time, e.g. on a
background thread while the largest bucket already serves. A step never reads past L: the
loop stops early instead (the rest comes from the next call).

The cache holds keys and values in the model's compute dtype, or with kv_dtype="int8" as
int8 with a float32 scale per (slot, kv head, position): about a quarter of a float32
cache's bytes, half of a bfloat16 one (kv_quant.py).

Every slot carries its own SamplingParams as array rows, and each slot's random draws come
from (its seed, its token index) only. Capacity: a slot holds `max_len` tokens (prompt +
generated); a prompt may use max_len - 1. Under a mesh, the cache's kv heads are split over
"tensor" and slots over the batch axes; parameters keep (or get) the shardings their
logical axes imply.
"""

import contextlib
import threading
from collections.abc import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research import sharding
from research.errors import RequestError, UserError
from research.serving.core import kv_cache, packed
from research.serving.core.kv_cache import key_buckets
from research.serving.core.sampling import SamplingParams, SlotParams, choose_tokens, slot_params

_MIN_BUCKET = 16  # Shortest prompt chunk compiled.


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
class Tokens:
    """What one `generate` call chose: [R, k] for the call's R rows and k = steps_per_call;
    token -1 = none (a finished slot, a step not run, or the step that fed a slot's pending
    first token: skip, do not stop)."""

    tokens: jax.Array  # int32
    logprobs: jax.Array  # float32, raw model log-probability of the token.
    top_ids: jax.Array  # int32 [R, k, N] the N most likely tokens (num_top_logprobs).
    top_logprobs: jax.Array  # float32 [R, k, N]
    live: jax.Array  # bool [R]: the slot goes on after this call.


def shard_params(params, mesh):
    """Places an nnx.State of parameters on `mesh` by their logical axes (sharding.RULES)."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.RULES):
        shardings = sharding.fit_shardings(nnx.get_named_sharding(params, mesh), params)
    return jax.device_put(params, shardings)


def length_buckets(max_len: int) -> tuple[int, ...]:
    """Prompt chunk lengths `extend` compiles for: powers of two from 16, then max_len."""
    buckets, size = [], _MIN_BUCKET
    while size < max_len:
        buckets.append(size)
        size *= 2
    return (*buckets, max_len)


def row_buckets(num_slots: int) -> tuple[int, ...]:
    """Slots a decode call may run: powers of two, then num_slots."""
    buckets, size = [], 1
    while size < num_slots:
        buckets.append(size)
        size *= 2
    return (*buckets, num_slots)


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
      kv_dtype: the KV cache's dtype: "auto" (the compute dtype) or "int8" (per kv head
        and position scales; see kv_quant.py).
      mesh: a (data, fsdp, tensor) mesh to run on; None = the parameters' mesh if they are
        placed on one, else the default device. Every call's state keeps the shardings the
        mesh implies, so no call ever recompiles for a state placed differently.
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
        kv_dtype: str = "auto",
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
        kv_cache.check_kv_dtype(kv_dtype, "sampler kv_dtype")
        if mesh is None:  # Parameters already on a mesh (e.g. `load`'s one device): that one.
            sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
            mesh = sharding.mesh if isinstance(sharding, jax.sharding.NamedSharding) else None
        self.model_config = model_config
        self.graphdef = graphdef
        self.num_slots, self.max_len, self.steps_per_call = num_slots, max_len, steps_per_call
        self.num_top_logprobs, self.max_stop_tokens = num_top_logprobs, max_stop_tokens
        self.kv_dtype = kv_dtype
        self.mesh = mesh
        # Decode on one CPU device reads Dense kernels packed in column panels (packed.py).
        self.packed = packed.should_pack(model_config, mesh)
        self.set_params(params)
        self.row_buckets = row_buckets(num_slots)
        self.key_buckets = key_buckets(max_len)
        shardings = self._state_shardings() if mesh is not None else None
        self._init = jax.jit(self._init_state, out_shardings=shardings)
        self._generate = jax.jit(
            self._generate_fn,
            donate_argnums=1,
            static_argnames=("num_rows", "num_keys"),
            out_shardings=None if mesh is None else (shardings, None),
        )
        self._executables: dict[tuple[int, int], object] = {}
        self._extend_executables: dict[tuple, object] = {}  # (rows, bucket, num_prompt_top)
        # Off (the engine): a decode call uses the smallest bucket compiled so far, never
        # compiling on the request path; on: it compiles the bucket it needs.
        self.compile_on_demand = True
        self._compile_lock = threading.Lock()
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
            cache=kv_cache.init_cache(self.model_config, b, self.max_len, self.kv_dtype),
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
        cache = kv_cache.cache_sharding(
            self.mesh, self.model_config, self.num_slots, self.max_len, self.kv_dtype
        )
        return shardings.replace(cache=cache)

    def _generate_fn(self, params, state: DecodeState, num_steps, *, num_rows, num_keys):
        """Up to num_steps decode steps for the live slots among the first num_rows, reading
        num_keys cache positions (see the module docstring)."""
        model = nnx.merge(self.graphdef, params)
        r, k, n = num_rows, self.steps_per_call, self.num_top_logprobs

        def rows(array):  # The first r rows of a per-slot array.
            return array if r == self.num_slots else array[:r]

        sub = jax.tree.map(rows, state.replace(cache=None))
        out = Tokens(
            tokens=jnp.full((r, k), -1, jnp.int32),
            logprobs=jnp.zeros((r, k), jnp.float32),
            top_ids=jnp.zeros((r, k, n), jnp.int32),
            top_logprobs=jnp.zeros((r, k, n), jnp.float32),
            live=sub.live,
        )
        rows_r = jnp.arange(r)

        def step(carry):
            index, sub, cache, out = carry
            live_r = sub.live
            chosen_r, logprobs_r, top_ids_rn, top_logprobs_rn = choose_tokens(
                sub.logits, sub.params, sub.output_counts, sub.seen, sub.num_generated, n
            )
            # A pending token (chosen by `activate`) is fed now; it was reported there.
            has_pending_r = sub.pending >= 0
            tokens_r = jnp.where(has_pending_r, sub.pending, chosen_r)
            new_r = live_r & ~has_pending_r
            num_generated_r = sub.num_generated + new_r
            # The chosen token makes lengths + 1 tokens; feeding it needs a free cache row.
            done_r = new_r & self._done(tokens_r, num_generated_r, sub.lengths, sub.params)
            continues_r = live_r & ~done_r
            positions_r = jnp.minimum(sub.lengths, self.max_len - 1)
            logits_rv, cache = kv_cache.decode_step(
                model, tokens_r, positions_r, live_r, cache, num_keys=num_keys
            )
            sub = sub.replace(
                logits=jnp.where(live_r[:, None], logits_rv, sub.logits),
                lengths=sub.lengths + continues_r,
                num_generated=num_generated_r,
                live=continues_r,
                output_counts=sub.output_counts.at[rows_r, tokens_r].add(new_r),
                seen=sub.seen.at[rows_r, tokens_r].max(new_r),
                pending=jnp.where(live_r, -1, sub.pending),
            )
            out = Tokens(
                tokens=out.tokens.at[:, index].set(jnp.where(new_r, tokens_r, -1)),
                logprobs=out.logprobs.at[:, index].set(logprobs_r),
                top_ids=out.top_ids.at[:, index].set(top_ids_rn),
                top_logprobs=out.top_logprobs.at[:, index].set(top_logprobs_rn),
                live=continues_r,
            )
            return index + 1, sub, cache, out

        def cond(carry):
            index, sub, _, _ = carry
            # A step feeds each live slot's token at position `lengths`, attending to the
            # keys before it: all of them must lie within the num_keys read.
            fits = jnp.all(jnp.where(sub.live, sub.lengths, 0) <= num_keys)
            return (index < num_steps) & jnp.any(sub.live) & fits

        _, sub, cache, out = jax.lax.while_loop(cond, step, (jnp.int32(0), sub, state.cache, out))

        def put_back(full, part):
            return part if r == self.num_slots else full.at[:r].set(part)

        state = jax.tree.map(put_back, state.replace(cache=None), sub).replace(cache=cache)
        return state, out.replace(live=sub.live)

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
        """R rows of prompt tokens into their slots (see `extend`); rows with a slot >=
        num_slots are padding. With num_prompt_top, also every position's scores."""
        model = nnx.merge(self.graphdef, params)
        x_rtd, cache = kv_cache.extend(model, tokens_rt, starts_r, state.cache, slots_r)
        last_r11 = jnp.maximum(num_real_r - 1, 0)[:, None, None]
        logits_rv = model.unembed(jnp.take_along_axis(x_rtd, last_r11, axis=1))[:, 0]

        def put(array, rows):  # Padding rows (slot out of range) are dropped.
            return array.at[slots_r].set(rows.astype(array.dtype), mode="drop")

        state = state.replace(cache=cache, logits=put(state.logits, logits_rv.astype(jnp.float32)))
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
        params = shard_params(params, self.mesh) if self.mesh is not None else params
        if self.packed:  # The same bytes in column panels: no second copy is kept.
            self.graphdef, params = packed.pack_params(self.graphdef, params)
        self.params = params

    def init_state(self) -> DecodeState:
        """Empty slots (nothing live) with a zero cache, sharded on the mesh if any."""
        with self._context():
            return self._init()

    def check_prompt(self, prompt_ids: Sequence[int]) -> None:
        """RequestError for an empty prompt, a prompt that leaves no room, or unknown ids."""
        if len(prompt_ids) == 0:
            raise RequestError("prompt", None, "is empty; give at least one token")
        if len(prompt_ids) >= self.max_len:
            raise RequestError(
                "prompt",
                None,
                f"has {len(prompt_ids)} tokens, more than the context of {self.max_len} holds "
                f"(prompt + at least one new token); shorten it to at most {self.max_len - 1}",
            )
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, (int, np.integer)) or not 0 <= t < vocab for t in prompt_ids):
            raise RequestError(
                "prompt", None, f"holds token ids outside [0, {vocab}) (the model's vocabulary)"
            )

    def check_request(self, request: SamplingParams) -> None:
        request.check(
            vocab_size=self.model_config.vocab_size,
            max_stop_tokens=self.max_stop_tokens,
            max_logprobs=self.num_top_logprobs,
        )

    # -- decode

    def bucket(self, num_rows: int, num_keys: int) -> tuple[int, int]:
        """The (rows, keys) bucket a decode call of num_rows slots and num_keys positions
        runs in: the smallest that holds them, or with `compile_on_demand` off, the smallest
        compiled one that does (the largest bucket when none is compiled yet)."""
        num_rows = min(max(num_rows, 1), self.num_slots)
        num_keys = min(max(num_keys, 1), self.max_len)
        ideal = (
            next(r for r in self.row_buckets if r >= num_rows),
            next(k for k in self.key_buckets if k >= num_keys),
        )
        if self.compile_on_demand or ideal in self._executables:
            return ideal
        fitting = [b for b in self._executables if b[0] >= num_rows and b[1] >= num_keys]
        if fitting:
            return min(fitting, key=lambda b: (b[0] * b[1], b))
        return self.row_buckets[-1], self.key_buckets[-1]

    def buckets(self) -> list[tuple[int, int]]:
        """Every (rows, keys) bucket, smallest work first (the order to compile them in)."""
        pairs = [(r, k) for r in self.row_buckets for k in self.key_buckets]
        return sorted(pairs, key=lambda b: (b[0] * b[1], b))

    def compiled_buckets(self) -> list[tuple[int, int]]:
        return list(self._executables)

    def compile_bucket(self, num_rows: int, num_keys: int) -> None:
        """Compiles `generate` for one bucket ahead of use (thread-safe; later calls may use
        it at once). Nothing runs on the device."""
        if (num_rows, num_keys) in self._executables:
            return
        with self._compile_lock, self._context():
            abstract_state = jax.eval_shape(self._init_state)
            if self.mesh is not None:
                shardings = self._state_shardings()
                abstract_state = jax.tree.map(
                    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                    abstract_state,
                    shardings,
                )
            lowered = self._generate.lower(
                self.params,
                abstract_state,
                np.int32(1),
                num_rows=num_rows,
                num_keys=num_keys,
            )
            self._executables[(num_rows, num_keys)] = lowered.compile()

    def compile_extend(self, bucket: int, num_prompt_top: int | None = None) -> None:
        """Compiles the one-row `extend` of `bucket` tokens (with num_prompt_top: the one that
        also scores every position) ahead of use; thread-safe, nothing runs."""
        with self._compile_lock, self._context():
            abstract_state = jax.eval_shape(self._init_state)
            if self.mesh is not None:
                abstract_state = jax.tree.map(
                    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                    abstract_state,
                    self._state_shardings(),
                )
            row, tokens = np.zeros((1,), np.int32), np.zeros((1, bucket), np.int32)
            lowered = self._extend.lower(
                self.params, abstract_state, tokens, row, row, row, tokens,
                num_prompt_top=num_prompt_top,
            )  # fmt: skip
            self._extend_executables[(1, bucket, num_prompt_top)] = lowered.compile()

    def generate(
        self, state: DecodeState, *, num_rows: int = 0, num_keys: int = 0, num_steps: int = 0
    ) -> tuple[DecodeState, Tokens]:
        """Up to num_steps (default and at most steps_per_call) tokens for every live slot in
        one jitted call. Returns the new state (the old one is donated) and Tokens whose rows
        are slots 0..R-1 of the bucket used (R >= num_rows).

        Args:
          num_rows: every live slot is below this (default: all slots).
          num_keys: every live slot's length + num_steps is at most this (default: max_len);
            too small only stops the call early, it never reads a wrong key.
        """
        num_steps = num_steps or self.steps_per_call
        if not 1 <= num_steps <= self.steps_per_call:
            raise UserError(f"num_steps={num_steps} must be in [1, {self.steps_per_call}].")
        rows, keys = self.bucket(num_rows or self.num_slots, num_keys or self.max_len)
        if (rows, keys) not in self._executables:
            self.compile_bucket(rows, keys)
        with self._context():
            return self._executables[(rows, keys)](self.params, state, np.int32(num_steps))

    def release(self, state: DecodeState, slot: int) -> DecodeState:
        """Stops `slot` (its tokens after this are not generated); the slot is then free."""
        with self._context():
            return self._release(state, np.int32(slot))

    # -- prompts

    def extend(
        self,
        state: DecodeState,
        rows: Sequence[tuple[int, Sequence[int], int]],
        *,
        num_rows: int = 0,
        bucket: int = 0,
        next_tokens: Sequence[int] | None = None,
        num_prompt_top: int | None = None,
    ) -> tuple[DecodeState, tuple | None]:
        """Writes prompt tokens into slots' caches: rows of (slot, tokens, start), distinct
        slots, each putting `tokens` at positions start.. of its slot (a whole prompt, a
        chunk of a long one, or the rest after cached prefix blocks) and leaving the slot's
        next-token logits at the last one. A slot is not live until `activate`. One call
        reads the weights once for all rows. The old state is donated.

        Args:
          num_rows: R to pad the rows to (a compiled size; default len(rows)).
          bucket: T to pad the tokens to (default: the smallest power of two from 16 that
            holds the longest row).
          next_tokens, num_prompt_top: for prompt log-probabilities (echo), one row only:
            the token after each of `tokens`, and how many alternatives to rank. Then the
            second result is (logprob of each next token [T], top ids [T, N], top logprobs
            [T, N]) on device, padded to the bucket; otherwise None.
        """
        num_rows = num_rows or len(rows)
        slots = [slot for slot, _, _ in rows]
        if not 1 <= len(rows) <= num_rows or len(set(slots)) != len(slots):
            raise UserError(f"extend: {len(rows)} rows for {num_rows}, slots {slots}.")
        if next_tokens is not None and len(rows) != 1:
            raise UserError("extend: prompt scores (next_tokens) need exactly one row.")
        for slot, tokens, start in rows:
            if not tokens or start + len(tokens) > self.max_len or not 0 <= slot < self.num_slots:
                raise UserError(
                    f"extend: {len(tokens)} tokens at {start} of slot {slot} do not fit "
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
        args = (self.params, state, tokens_rt, slots_r, starts_r, num_real_r, next_rt)
        executable = self._extend_executables.get((num_rows, bucket, num_prompt_top))
        with self._context():
            if executable is not None:  # Compiled ahead (compile_extend).
                state, scores = executable(*args)
            else:
                state, scores = self._extend(*args, num_prompt_top=num_prompt_top)
        return state, None if scores is None else tuple(a[0] for a in scores)

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
