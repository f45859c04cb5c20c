"""Counter-based, stateless RNG for per-env streams (compile- and device-friendly).

Every random number is a pure function ``hash(key[e], counter[e], stream, element index)``:
there is no generator object, so a batch of envs each owns its stream through two int64 tensors
(``key``, ``counter``) that live in the engine state. Re-keying some rows never touches the others,
the same key/counter gives bit-identical integers on every device, and the whole thing is plain
integer tensor arithmetic that ``torch.compile(fullgraph=True)`` traces.

The mixer is a 32-bit integer hash (lowbias32-style xorshift-multiply rounds) evaluated in int64:
values are kept in ``[0, 2**32)`` by masking after every multiply, and the multipliers are odd
constants below ``2**31``, so every intermediate product stays below ``2**63`` (no signed overflow,
which would be undefined on some backends).
"""

from __future__ import annotations

import math

import torch

MASK32 = 0xFFFFFFFF
_M1 = 0x7FEB352D  # odd, < 2**31 (lowbias32 first multiplier)
_M2 = 0x5BD1E995  # odd, < 2**31 (murmur2 multiplier)
_GOLDEN = 0x9E3779B9  # added (never multiplied) to break the mix(0) == 0 fixed point
_STREAM_MUL = 0x61C88647  # odd, < 2**31 (2**32 - golden ratio constant), spreads stream ids
_U_SCALE = 2.0**-23


def mix32(x: torch.Tensor) -> torch.Tensor:
    """One avalanche round on int64 values in ``[0, 2**32)``; output in the same range."""
    x = x ^ (x >> 16)
    x = (x * _M1) & MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & MASK32
    x = x ^ (x >> 16)
    return x


def combine(h: torch.Tensor, v: torch.Tensor | int) -> torch.Tensor:
    """Fold a value (int64, any range) into a running 32-bit hash."""
    v_lo, v_hi = v & MASK32, (v >> 32) & MASK32
    v_h = mix32((v_lo + _GOLDEN) & MASK32) ^ mix32((v_hi + 2 * _GOLDEN) & MASK32)
    return mix32(((h ^ v_h) + _GOLDEN) & MASK32)


def episode_seed(base_seed: int, env_index: torch.Tensor, episode: torch.Tensor) -> torch.Tensor:
    """Per-env 32-bit key (int64 tensor like ``env_index``) for episode ``episode`` of env ``env_index``.

    Mixing (base seed, env index, episode count) means each env's episodes get fresh, independent
    latents whatever the other envs do, and the whole run is reproducible from ``base_seed``.
    """
    env_index = env_index.to(torch.int64)
    episode = torch.as_tensor(episode, dtype=torch.int64, device=env_index.device)
    h = combine(torch.zeros_like(env_index), int(base_seed))
    h = combine(h, env_index)
    return combine(h, episode)


def _base(key: torch.Tensor, counter: torch.Tensor, stream: int) -> torch.Tensor:
    """Per-env hash of (key, counter, stream): the root of one stream's draws at one counter value."""
    h = combine(key & MASK32, counter)
    return combine(h, (stream * _STREAM_MUL) & MASK32)


def random_u32(
    key: torch.Tensor, counter: torch.Tensor, stream: int, shape: tuple[int, ...]
) -> torch.Tensor:
    """Uniform 32-bit integers (int64) of shape ``[*key.shape, *shape]``.

    ``key``/``counter`` are ``[E]`` int64; ``stream`` separates independent uses at one counter.
    """
    base = _base(key, counter, stream)
    n = math.prod(shape)
    idx = torch.arange(n, dtype=torch.int64, device=key.device).reshape(shape)
    base = base.reshape(base.shape + (1,) * len(shape))
    return mix32(mix32(base ^ idx))


def uniform(
    key: torch.Tensor, counter: torch.Tensor, stream: int, shape: tuple[int, ...] = ()
) -> torch.Tensor:
    """Float32 uniforms strictly inside (0, 1), shape ``[*key.shape, *shape]``.

    Uses the top 23 bits: ``(k + 0.5) / 2**23`` is exact in float32, never 0 (safe for ``log``)
    and never 1.
    """
    bits = random_u32(key, counter, stream, shape) >> 9
    return (bits.to(torch.float32) + 0.5) * _U_SCALE


def normal(
    key: torch.Tensor, counter: torch.Tensor, stream: int, shape: tuple[int, ...] = ()
) -> torch.Tensor:
    """Standard normals (float32) by Box-Muller, shape ``[*key.shape, *shape]``.

    The two uniforms come from element indices ``2i`` and ``2i + 1`` of the same stream.
    """
    u = uniform(key, counter, stream, (*shape, 2))
    u1, u2 = u[..., 0], u[..., 1]
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
