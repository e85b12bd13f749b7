"""The candidate features of the pruned pass's training mode (docs/method.md §3).

Each token's candidates are its vanilla top K + n_threshold features (in rank order) and n_random
others drawn uniformly from the rest: the pruned pre-activations are computed at these only.
The random others are the first n distinct draws outside the top set from iid uniform draws.
On the CPU both parts are csrc/candidates.c: the top by a radix select, the random others picked
from the draws with a mark row (0.21-0.28 s with torch's `topk` and a sort of the draws against
0.055-0.08 s per transcoder at F 12288 and 4096 tokens). The same features as the torch code
from the same draws; only the order among exactly equal pre-activations can differ (the kernel
puts the lower feature first, torch's `topk` promises no order).
"""

from __future__ import annotations

import ctypes
import math

import torch
from torch import Tensor

from . import native


def select_candidates(
    pre_BF: Tensor, k: int, n_threshold: int, n_random: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """cand_BN, N = k + n_threshold + n_random: the k highest of each row of pre_BF, the next
    n_threshold (each part in no set order), then n_random distinct features outside them,
    uniformly at random (`random_others`)."""
    B, F = pre_BF.shape
    n_top = k + n_threshold
    lib = _top_kernel(pre_BF)
    if lib is None:
        top_BM = pre_BF.topk(n_top, dim=1, sorted=True).indices
        if n_random == 0:
            return top_BM
        return torch.cat([top_BM, random_others(top_BM, F, n_random, generator)], 1)
    cand_BN = torch.empty(B, n_top + n_random, dtype=torch.int64)
    _top_c(lib, pre_BF, k, n_top, cand_BN)
    if n_random:
        cand_BN[:, n_top:] = random_others(cand_BN[:, :n_top], F, n_random, generator)
    return cand_BN


def top_indices(pre_BF: Tensor, k: int) -> Tensor:
    """The k highest of each row of pre_BF, [B, k], in no set order (a TopK's choice)."""
    lib = _top_kernel(pre_BF)
    if lib is None:
        return pre_BF.topk(k, dim=1, sorted=False).indices
    return _top_c(lib, pre_BF, k, k, torch.empty(pre_BF.shape[0], k, dtype=torch.int64))


def _top_kernel(pre_BF: Tensor) -> ctypes.CDLL | None:
    """csrc/candidates.c's top_features where it applies to pre_BF."""
    ok = pre_BF.dtype == torch.float32 and pre_BF.shape[1] < 2**31 and pre_BF.stride(0) > 0
    return _kernel(pre_BF) if ok else None


def _top_c(lib: ctypes.CDLL, pre_BF: Tensor, k: int, M: int, out_BN: Tensor) -> Tensor:
    """out_BN[:, :k]: the top k of pre_BF's rows, out_BN[:, k:M] the next M - k, each in no set
    order, by csrc/candidates.c."""
    (B, F), N = pre_BF.shape, out_BN.shape[1]
    n_parts = native.parts(B)
    # per part: the histogram; the ranks of the kept features, of two bins' and between, scratch
    hists = torch.zeros(n_parts, 1 << 11, dtype=torch.int64)
    ranks = torch.empty(n_parts, 5 * F, dtype=torch.int64)
    native.run(lib, "top_features", n_parts, B, F, pre_BF.stride(0), k, M, N, pre_BF.data_ptr(),
               hists.data_ptr(), ranks.data_ptr(), out_BN.data_ptr())
    return out_BN


def random_others(
    top_BM: Tensor, n_features: int, n: int, generator: torch.Generator | None = None
) -> Tensor:
    """n distinct features per row drawn uniformly from those not in the row of top_BM, [B, n].

    The first n distinct draws outside the row's top set, from iid uniform draws: a uniform
    random n-subset, instead of a random score per feature and a top-n over them ([B, F]: 4x
    slower at F 12288; at F 1024, 11 ms against 2 ms for 1024 tokens with the C kernel). The
    draws are the b-bit fields of random 63-bit words (2^b >= F, `draw_fields`; fields >= F are
    not usable): a generator call per word, not per draw (~3 ns each on the CPU, 6 draws a word
    at F 1024). A draw is usable with chance at least p = (F - M - n) / 2^b, so a row needs n / p
    draws on average (a negative binomial count): it gets that and 8 standard deviations more,
    and 32. Where F is under 2 (n + M), and in the rare batch where a row falls short of n usable
    draws, the random scores are used.
    """
    B, M = top_BM.shape
    if n_features >= 2 * (n + M):
        bits = (n_features - 1).bit_length()
        p = (n_features - M - n) / 2**bits
        n_draws = math.ceil((n + 8 * math.sqrt(n * (1 - p))) / p) + 32
        words = torch.empty(B, -(-n_draws // (63 // bits)), dtype=torch.int64,
                               device=top_BM.device).random_(generator=generator)
        lib = _kernel(top_BM, words) if top_BM.dtype == torch.int64 else None
        found = (_first_usable_c(lib, top_BM, words, n_features, n) if lib is not None
                 else _first_usable(top_BM, draw_fields(words, n_features), n_features, n))
        if found is not None:
            return found
    scores_BF = torch.rand(B, n_features, generator=generator, device=top_BM.device)
    scores_BF.scatter_(1, top_BM, -1.0)
    return scores_BF.topk(n, dim=1, sorted=False).indices


def draw_fields(words: Tensor, n_features: int) -> Tensor:
    """The draws [B, O] held in random 63-bit words ([B, O / (63 // b)]): each word's b-bit fields
    (2^b >= n_features), lowest first; uniform on [0, 2^b), so those >= n_features are to be
    skipped."""
    bits = (n_features - 1).bit_length()
    shifts = torch.arange(0, 63 // bits * bits, bits, device=words.device)
    return ((words[:, :, None] >> shifts) & (2**bits - 1)).flatten(1)


def _first_usable(top_BM: Tensor, draws_BO: Tensor, n_features: int, n: int) -> Tensor | None:
    """Each row's first n draws that are features (< n_features), repeat no earlier draw and are
    not in its top set, [B, n]; None if a row has fewer."""
    M = top_BM.shape[1]
    sorted_BO, order_BO = draws_BO.sort(dim=1, stable=True)
    repeat_BO = torch.zeros_like(sorted_BO, dtype=torch.bool)
    repeat_BO[:, 1:] = sorted_BO[:, 1:] == sorted_BO[:, :-1]
    top_sorted_BM = top_BM.sort(dim=1).values
    at_BO = torch.searchsorted(top_sorted_BM, sorted_BO).clamp_max(M - 1)
    in_top_BO = top_sorted_BM.gather(1, at_BO) == sorted_BO
    unusable_BO = repeat_BO | in_top_BO | (sorted_BO >= n_features)
    usable_BO = torch.empty_like(repeat_BO).scatter_(1, order_BO, ~unusable_BO)
    take_BO = usable_BO & (usable_BO.cumsum(1) <= n)
    if not bool((take_BO.sum(1) == n).all()):
        return None
    return draws_BO[take_BO].view(-1, n)


def _first_usable_c(lib: ctypes.CDLL, top_BM: Tensor, words: Tensor, n_features: int,
                    n: int) -> Tensor | None:
    """`_first_usable` of `draw_fields(words)` by csrc/candidates.c, the rows in parts
    (`native.run`)."""
    words = words.contiguous()
    (B, M), n_words = top_BM.shape, words.shape[1]
    out_Bn = torch.empty(B, n, dtype=torch.int64)
    n_parts = native.parts(B)
    marks = torch.zeros(n_parts, n_features, dtype=torch.uint8)
    short = torch.empty(n_parts, dtype=torch.int64)
    native.run(lib, "random_others", n_parts, B, n_features, M, top_BM.data_ptr(),
               top_BM.stride(0), n_words, words.data_ptr(), (n_features - 1).bit_length(), n,
               marks.data_ptr(), out_Bn.data_ptr(), short.data_ptr())
    return None if int(short.sum()) else out_Bn


def _kernel(*tensors: Tensor) -> ctypes.CDLL | None:
    """csrc/candidates.c where it applies (on the CPU, rows of contiguous elements, a C
    compiler), else None."""
    if not all(t.device.type == "cpu" and t.stride(-1) == 1 for t in tensors):
        return None
    lib = native.load("candidates")
    if lib is not None and lib.random_others.argtypes is None:
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.top_features.argtypes = [i64] * 9 + [p] * 4
        lib.random_others.argtypes = [i64] * 6 + [p, i64, i64, p, i64, i64, p, p, p]
        lib.top_features.restype = lib.random_others.restype = None
    return lib
