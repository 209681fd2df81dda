"""rstr's seeded noise: one generator, written out here (numpy) and in the C++ runtime.

``standard_normal(seed, shape)`` is what ``rstr sample --seed``, ``Pipeline(seed=)``,
``rstr-export run --seed``, ``rstr-export verify --seed`` and ``rstr-run --seed`` draw, so one seed
gives the same initial noise everywhere (docs/seeding.md):

* **Bits**: Philox4x32-10 (Salmon et al., SC'11; Random123's reference, the generator of cuRAND
  and of PyTorch's CUDA RNG), keyed by the seed, ``key = (seed mod 2^32, seed div 2^32)``; block
  ``n`` is the cipher of the counter ``(n mod 2^32, n div 2^32, 0, 0)`` and gives four 32-bit
  words ``x0..x3``.
* **Normals**: value ``4n + j`` of the flattened (C-order) array comes from block ``n``:
  Box-Muller in float64 on the pairs ``(x0, x1)`` and ``(x2, x3)`` with uniforms
  ``u = (x + 0.5) / 2^32`` in ``(0, 1)``: ``r = sqrt(-2 ln u_a)``, ``a = 2 pi u_b``,
  values ``r cos a`` and ``r sin a``, rounded to float32.

The stream does not depend on the shape: the first ``k`` values are the same for every array of
at least ``k`` values, so image 0 of a batch of four has the noise of a batch of one.
"""

from __future__ import annotations

import math
import os

import numpy as np
from rstr.engines.base import InputError

from rstr.errors import RstrError

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)  # Philox4x32 multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
_LOW = np.uint64(0xFFFFFFFF)
_SHIFT = np.uint64(32)
SEED_LIMIT = 2**64


def philox4x32(counters: np.ndarray, key: tuple[int, int], rounds: int = 10) -> np.ndarray:
    """Philox4x32-``rounds`` of every row of ``counters`` (``uint32 [N, 4]``) under ``key``; ``uint32 [N, 4]``."""
    c = np.asarray(counters, dtype=np.uint32).astype(np.uint64)
    c0, c1, c2, c3 = c[:, 0], c[:, 1], c[:, 2], c[:, 3]
    k0, k1 = int(key[0]), int(key[1])
    for _ in range(rounds):
        p0, p1 = _M0 * c0, _M1 * c2  # 32 x 32 -> 64 bits: exact in uint64
        c0, c1, c2, c3 = (p1 >> _SHIFT) ^ c1 ^ np.uint64(k0), p1 & _LOW, (p0 >> _SHIFT) ^ c3 ^ np.uint64(k1), p0 & _LOW
        k0, k1 = (k0 + _W0) & 0xFFFFFFFF, (k1 + _W1) & 0xFFFFFFFF
    return np.stack([c0, c1, c2, c3], axis=1).astype(np.uint32)


def check_seed(seed: int) -> int:
    """``seed`` when it is an integer in ``[0, 2^64)``; else :class:`~rstr.engines.base.InputError`."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < SEED_LIMIT:
        raise InputError(f"seed {seed!r} must be an integer from 0 to 2^64 - 1")
    return int(seed)


def standard_normal(seed: int, shape: tuple[int, ...] | list[int]) -> np.ndarray:
    """float32 standard normal noise of ``shape`` from ``seed`` (the scheme in the module docstring)."""
    seed = check_seed(seed)
    size = math.prod(int(d) for d in shape)
    blocks = -(-size // 4)
    n = np.arange(blocks, dtype=np.uint64)
    counters = np.zeros((blocks, 4), dtype=np.uint32)
    counters[:, 0], counters[:, 1] = n & _LOW, n >> _SHIFT
    words = philox4x32(counters, (seed & 0xFFFFFFFF, seed >> 32)).astype(np.float64)
    u = (words + 0.5) * 2.0**-32
    r = np.sqrt(-2.0 * np.log(u[:, 0::2]))  # pairs (x0, x1) and (x2, x3): radius from the first ...
    angle = 2.0 * np.pi * u[:, 1::2]  # ... angle from the second
    out = np.empty((blocks, 4), dtype=np.float64)
    out[:, 0::2], out[:, 1::2] = r * np.cos(angle), r * np.sin(angle)
    return out.reshape(-1)[:size].astype(np.float32).reshape(tuple(int(d) for d in shape))


def load_noise(path: str | os.PathLike[str], shape: tuple[int, ...] | list[int]) -> np.ndarray:
    """Initial noise from a float32 ``.npy`` file of ``shape`` (``--noise``); :class:`~rstr.engines.base.InputError` otherwise."""
    shape = tuple(int(d) for d in shape)
    try:
        noise = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RstrError(f"--noise {path}: not a readable .npy file ({first})") from None
    if not isinstance(noise, np.ndarray) or noise.dtype != np.float32:
        raise RstrError(
            f"--noise {path}: dtype {getattr(noise, 'dtype', type(noise).__name__)} is not float32; save float32 noise"
        )
    if noise.shape != shape:
        raise RstrError(f"--noise {path}: shape {list(noise.shape)} is not the sample shape {list(shape)}")
    if not np.isfinite(noise).all():
        raise RstrError(f"--noise {path}: contains NaN or infinite values")
    return noise
