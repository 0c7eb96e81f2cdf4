"""Sampling parameters (validated on the host) and on-device sampling without a vocabulary sort."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jlora.errors import RequestError
from jlora.structured import StructuredOutput


SEED_RANGE = (0, 1 << 32)  # the device draws with a uint32 seed
INT32_MAX = (1 << 31) - 1  # top_k, max_tokens and stop ids are int32 on the device
MAX_TEMPERATURE = 1e4  # far past where every token is equally likely; keeps 1 / temperature a normal float32
MAX_STOP = 16  # stop strings per request: each is searched for after every token
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 256
MAX_LOGIT_BIAS = 300  # logit_bias entries per request: a fixed-size table per sequence on the device
LOGIT_BIAS_RANGE = 100.0  # OpenAI's range of one bias
MAX_CHOICES = 64  # n and best_of: sequences one request may run per prompt
MAX_LOGPROBS = 20  # top logprobs per token a request may ask for (the engine computes this many when one asks)
PENALTY_RANGE = 2.0  # presence and frequency penalties lie in [-2, 2] (OpenAI, vLLM)
MAX_REPETITION_PENALTY = 1e4
# Truncated sampling (top_k, top_p) looks at the TOP_WINDOW most likely tokens, found by `jax.lax.top_k` instead of a
# sort of the whole vocabulary; see `sample` for when that equals sampling after a full sort.
TOP_WINDOW = 256


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _in(name: str, v, lo: float, hi: float, lo_open: bool = False) -> None:
    ok = _is_number(v) and math.isfinite(v) and (lo < v if lo_open else lo <= v) and v <= hi
    if not ok:
        raise RequestError(f"{name} must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v!r}")


def check_text(field: str, text: str) -> None:
    """Text a client sent must be encodable: no lone surrogates (JSON's \\ud800 escapes allow them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{field} must be valid Unicode text: it holds a lone surrogate") from None


def _logit_bias(value) -> tuple[tuple[int, float], ...]:
    """{token id: bias} (or (id, bias) pairs) as sorted pairs; ids are checked against the vocabulary later."""
    items = value.items() if isinstance(value, dict) else value
    try:
        pairs = [(i, b) for i, b in items]
    except (TypeError, ValueError):
        raise RequestError(f"logit_bias must map token ids to numbers, got {type(value).__name__}") from None
    if len(pairs) > MAX_LOGIT_BIAS:
        raise RequestError(f"logit_bias has {len(pairs)} entries; at most {MAX_LOGIT_BIAS} are allowed")
    for i, b in pairs:
        if not _is_int(i) or not 0 <= i <= INT32_MAX:
            raise RequestError(f"logit_bias keys must be token ids (integers >= 0), got {i!r}")
        _in(f"logit_bias[{i}]", b, -LOGIT_BIAS_RANGE, LOGIT_BIAS_RANGE)
    if len({i for i, _ in pairs}) != len(pairs):
        raise RequestError("logit_bias names a token id twice")
    return tuple(sorted((i, float(b)) for i, b in pairs))


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings, with vLLM's names and definitions. temperature=0 is greedy; top_k <= 0,
    top_p=1 and min_p=0 disable those.

    Logits are processed in vLLM's order: logit_bias is added and, while fewer than `min_tokens` tokens are out, EOS
    and `stop_token_ids` are masked; then the penalties: `repetition_penalty` divides the positive logits and
    multiplies the others of every token seen in the prompt or the output, `frequency_penalty` subtracts
    penalty x (times the token is in the output) and `presence_penalty` penalty x (whether it is); then greedy takes
    the argmax, or temperature, min_p (drop tokens below min_p x the top probability), top_k and top_p apply.

    Every field is range-checked here, once, for the library, HTTP and gRPC alike: a value the device cannot
    hold (a seed of 2^32, a top_k of 2^31) is refused with a `RequestError` naming the field and its range,
    never found later inside a step. Token ids are checked against the vocabulary by the engine.

    `logprobs` (k in [0, 20]) returns, for every output token, its log-probability and the k most likely tokens';
    `prompt_logprobs` the same for the prompt's tokens (the first has none). Both are of the distribution the model
    produced: float32 log-softmax of the raw logits, before processors, temperature and truncation (vLLM's
    default). max_tokens may be 0 (nothing is generated: with prompt_logprobs, the prompt is scored).

    `n` choices are returned per prompt; with `best_of`, that many are generated and the n of highest cumulative
    logprob returned. The engine runs one sequence per choice (`choices`): `LLM.generate` and the servers expand
    them, and the prompt is prefilled once (the others start from its pages in the prefix cache).

    `structured` (a `jlora.structured.StructuredOutput`: a JSON schema, any JSON object, a regex or a Lark grammar)
    constrains the output: at every step the tokens the grammar does not allow are masked (-inf) before the
    processors and sampling, and the request stops ("stop") once the grammar is complete. The grammar is compiled
    when the engine takes the request, which refuses a bad one alone (`RequestError`); logprobs stay those of the
    model's distribution, before the mask. It cannot be combined with min_tokens (the grammar decides where the
    output ends)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    max_tokens: int = 16
    min_tokens: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs; a dict is accepted
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    n: int = 1
    best_of: int | None = None
    structured: StructuredOutput | None = None  # a dict {"kind", "spec"} is accepted

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        for name in ("stop", "stop_token_ids"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise RequestError(f"{name} must be a list, got {type(value).__name__}")
            object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias or ()))
        t = self.temperature
        if not _is_number(t) or not math.isfinite(t) or not 0 <= t <= MAX_TEMPERATURE:
            raise RequestError(f"temperature must be a finite number in [0, {MAX_TEMPERATURE:g}], got {t!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        _in("min_p", self.min_p, 0, 1)
        if not _is_int(self.top_k) or not -1 <= self.top_k <= INT32_MAX:
            raise RequestError(f"top_k must be an integer in [-1, {INT32_MAX}] (0 or -1 disables it), "
                               f"got {self.top_k!r}")
        if not _is_int(self.max_tokens) or not 0 <= self.max_tokens <= INT32_MAX:
            raise RequestError(f"max_tokens must be an integer in [0, {INT32_MAX}], got {self.max_tokens!r}")
        if not _is_int(self.n) or not 1 <= self.n <= MAX_CHOICES:
            raise RequestError(f"n must be an integer in [1, {MAX_CHOICES}], got {self.n!r}")
        if self.best_of is not None and (not _is_int(self.best_of) or not self.n <= self.best_of <= MAX_CHOICES):
            raise RequestError(f"best_of must be an integer in [n={self.n}, {MAX_CHOICES}] or null, "
                               f"got {self.best_of!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise RequestError(f"{name} must be an integer in [0, {MAX_LOGPROBS}] or null, got {value!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise RequestError(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], "
                               f"got {self.min_tokens!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            _in(name, getattr(self, name), -PENALTY_RANGE, PENALTY_RANGE)
        _in("repetition_penalty", self.repetition_penalty, 0, MAX_REPETITION_PENALTY, lo_open=True)
        lo, hi = SEED_RANGE
        if self.seed is not None and (not _is_int(self.seed) or not lo <= self.seed < hi):
            raise RequestError(f"seed must be an integer in [0, 2^32), got {self.seed!r}")
        if len(self.stop) > MAX_STOP or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS
                                                for s in self.stop):
            raise RequestError(f"stop must be at most {MAX_STOP} non-empty strings of at most {MAX_STOP_CHARS} "
                               f"characters, got {len(self.stop)} of lengths "
                               f"{[len(s) if isinstance(s, str) else type(s).__name__ for s in self.stop[:MAX_STOP]]}")
        for s in self.stop:
            check_text("stop", s)
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS or not all(
                _is_int(i) and 0 <= i <= INT32_MAX for i in self.stop_token_ids):
            raise RequestError(f"stop_token_ids must be at most {MAX_STOP_TOKEN_IDS} integers in [0, {INT32_MAX}]")
        if not isinstance(self.ignore_eos, bool):
            raise RequestError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        self._check_structured()

    def _check_structured(self) -> None:
        value = self.structured
        if isinstance(value, dict):  # as `dataclasses.asdict` wrote it (multi-host commands)
            try:
                value = StructuredOutput(**value)
            except TypeError:
                raise RequestError(f"structured must be a StructuredOutput or {{kind, spec}}, got keys "
                                   f"{sorted(map(str, value))[:4]}") from None
            object.__setattr__(self, "structured", value)
        if value is not None and not isinstance(value, StructuredOutput):
            raise RequestError(f"structured must be a StructuredOutput or null, got {type(value).__name__}")
        if value is not None and self.min_tokens > 0:
            raise RequestError(f"min_tokens={self.min_tokens} cannot be combined with structured output: the "
                               "grammar decides where the output ends")

    def choices(self) -> list["SamplingParams"]:
        """The sequences to run: best_of (else n) of them, each with n=1; choice j's seed is seed + j (as in vLLM),
        and when best_of picks, each computes its tokens' logprobs (for the cumulative logprob it is picked by)."""
        count = self.best_of or self.n
        logprobs = 0 if self.logprobs is None and count > self.n else self.logprobs
        return [dataclasses.replace(self, n=1, best_of=None, logprobs=logprobs,
                                    seed=None if self.seed is None else (self.seed + j) % SEED_RANGE[1])
                for j in range(count)]

    @property
    def uses_processors(self) -> bool:
        """Whether the logits need more than temperature and truncation: penalties, a bias or min_tokens. Such a
        request holds a row of penalty state on the device while it runs (`sampling_penalties`)."""
        return (self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
                or bool(self.logit_bias) or self.min_tokens > 0)


def sample(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
           keys: jax.Array, greedy_only: bool | None = None, *, min_p: jax.Array | None = None,
           window: int = TOP_WINDOW) -> jax.Array:
    """Draws one token per row.

    Semantics: greedy rows (temperature 0) take argmax(logits). Other rows draw from softmax(logits / temperature)
    after min_p, top_k and top_p, as vLLM defines them: min_p drops tokens whose probability is below min_p times
    the largest; top_k keeps the k most likely of the rest; top_p keeps the most likely of those, in order, while
    the probability mass before each (renormalized over the top_k set) is below top_p (at least one token).

    No vocabulary sort: min_p is a threshold, and truncation looks only at the `window` most likely tokens
    (`jax.lax.top_k`). Rows without top_k or top_p draw over the whole vocabulary (inverse CDF in vocabulary order).
    The draw equals full-sort sampling exactly when 1 <= top_k <= window (any top_p, min_p), or when top_k is off
    and the top_p set has at most `window` tokens. Otherwise the draw is from the `window` most likely tokens
    (after min_p): top_k > window acts as top_k = window (top_p then renormalizes over the window), and with top_k
    off a top_p set wider than the window is cut to it (tests/test_sampling.py checks both against a full sort).

    Args:
      logits: [B, V] float32.
      temperature: [B] float32; 0 means greedy.
      top_k: [B] int32; <= 0 keeps every token.
      top_p: [B] float32 in (0, 1].
      keys: [B] PRNG keys, one per row (reproducible per request).
      greedy_only: static: True if the caller knows every row is greedy, False to draw without checking, None to
        check on the device. The check is a conditional, whose predicate XLA's GPU runtime reads back to the host:
        inside a loop of decode steps that stalls the device once per step.
      min_p: [B] float32 in [0, 1], or None for 0.
      window: static: how many of the most likely tokens truncated sampling considers.
    Returns:
      [B] int32 token ids.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if min_p is None:
        min_p = jnp.zeros_like(top_p)

    def draw():
        return jnp.where(temperature > 0, _pick(candidates(logits, temperature, top_k, top_p, min_p, window), keys),
                         greedy)

    if greedy_only is not None:
        return greedy if greedy_only else draw()
    # The draw is skipped when every row is greedy.
    return jax.lax.cond(jnp.all(temperature <= 0), lambda: greedy, draw)


def candidates(logits, temperature, top_k, top_p, min_p, window: int = TOP_WINDOW):
    """What `sample` draws from, unnormalized: (windowed [B] bool, window ids [B, K], window weights [B, K], full
    weights [B, V]). A windowed row draws ids[b, j] with probability proportional to window weights[b, j]; any other
    row draws token v with probability proportional to full weights[b, v]."""
    V = logits.shape[-1]
    K = min(window, V)
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    top = jnp.max(scaled, axis=-1, keepdims=True)
    # min_p: p_v >= min_p * p_max  <=>  s_v - s_max >= log(min_p); min_p = 0 keeps all (log 0 = -inf)
    floor = jnp.log(min_p)[:, None]
    scaled = jnp.where(scaled - top >= floor, scaled, -jnp.inf)
    full = jnp.exp(scaled - top)  # [B, V]; 0 where min_p dropped a token
    vals, ids = jax.lax.top_k(scaled, K)  # [B, K], most likely first
    rank = jnp.arange(K)[None, :]
    k_off = (top_k <= 0) | (top_k >= V)
    k = jnp.where(k_off | (top_k > K), K, top_k)[:, None]
    in_k = rank < k
    # top_p's mass is renormalized over the top_k set: the whole (min_p-cut) vocabulary when top_k is off
    mass = jnp.where(k_off, jnp.sum(full, axis=-1), jnp.sum(jnp.where(in_k, jnp.exp(vals - top), 0.0), axis=-1))
    p = jnp.where(in_k, jnp.exp(vals - top), 0.0) / mass[:, None]
    before = jnp.cumsum(p, axis=-1) - p  # mass strictly above each token
    keep = in_k & ((before < top_p[:, None]) | (rank == 0))
    windowed = ~k_off | (top_p < 1)
    return windowed, ids, jnp.where(keep, jnp.exp(vals - top), 0.0), full


def _pick(cands, keys) -> jax.Array:
    """One inverse-CDF draw per row from `candidates`: a single uniform per row, no Gumbel noise over V."""
    windowed, ids, w_win, w_full = cands
    u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)[:, None]

    def first_above(w):  # the first index whose cumulative weight passes u * total (never a zero-weight one)
        c = jnp.cumsum(w, axis=-1)
        return jnp.minimum(jnp.sum(c <= u * c[:, -1:], axis=-1), w.shape[-1] - 1)

    from_window = jnp.take_along_axis(ids, first_above(w_win)[:, None], axis=-1)[:, 0]
    return jnp.where(windowed, from_window, first_above(w_full)).astype(jnp.int32)
