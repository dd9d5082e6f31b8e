"""Dynamic grouping of weight magnitudes (WGM, methods.md §5): pure functions.

A grouping partitions the weights of a matrix (scope "matrix") or of each row (scope "row")
into at most G groups of contiguous sorted |w|. Each group g gets alpha_g = mean |w| of its
members and the weight becomes sign(w)·alpha_g. The objective of a grouping is

    sum_g  |A_g|·Var(A_g) + lambda/|A_g|    (|A|·Var(A) = sum a² - (sum a)²/|A|)

over the magnitudes divided by their grouping's mean |w| (so that lambda is scale-free), so a
group's cost is O(1) from its count, sum and sum of squares. Three algorithms:
  dp        exact dynamic programme over cut points, O(G·n²): small inputs, the tests' oracle
  greedy    from singletons, merge the adjacent pair whose merge increases the total cost least
  windowed  the paper's WGM: from windows of `window` sorted magnitudes, then greedy

Greedy merging is vectorised: in each pass every adjacent pair whose cost increase is a local
minimum (smaller than both neighbouring pairs') merges at once. These pairs share no segment,
and the globally cheapest pair is always among them, so a pass does what the heap-ordered
sequential greedy does for its cheapest merge, plus every other merge that does not touch it;
the last pass of a row takes only as many of them, cheapest first, as reach G groups. Merges
continue below G while one lowers the cost (lambda makes tiny groups expensive).

Zeros need no special case: they sort first, a group of zeros gets alpha = 0 and reproduces
them exactly, and a mixed group's alpha = mean |w| counts them, which is the L2-optimal scale
for sign(0) = +1.
"""
from __future__ import annotations

import torch
from torch import Tensor

ALGORITHMS = ["dp", "greedy", "windowed"]
SCOPES = ["matrix", "row"]


def group_cost(count: Tensor, total: Tensor, total_sq: Tensor, lambda_reg: float) -> Tensor:
    """|A|·Var(A) + lambda/|A| of groups given their count, sum |w| and sum w² (float64)."""
    return total_sq - total * total / count + lambda_reg / count


def dp_cuts(sorted_mag: Tensor, max_groups: int, lambda_reg: float) -> list[int]:
    """Exact optimum over all groupings of the 1-D ascending `sorted_mag` into 1..max_groups
    contiguous groups. Returns the start index of each group (first is 0)."""
    a = sorted_mag.double()
    n = a.numel()
    s1 = torch.cat([a.new_zeros(1), a.cumsum(0)])
    s2 = torch.cat([a.new_zeros(1), (a * a).cumsum(0)])
    k = torch.arange(n + 1)
    count = (k[None, :] - k[:, None]).double()  # cost[k, j] of the group a[k:j]
    with torch.no_grad():
        cost = group_cost(count, s1[None, :] - s1[:, None], s2[None, :] - s2[:, None], lambda_reg)
    cost = torch.where(count > 0, cost, torch.full_like(cost, float("inf")))
    best = torch.full((n + 1,), float("inf"), dtype=torch.float64)
    best[0] = 0.0
    choices, finals = [], []
    for _ in range(min(max_groups, n)):
        total = best[:, None] + cost            # [k, j]: previous groups end at k, this one is k:j
        best, arg = total.min(dim=0)
        choices.append(arg)
        finals.append(best[n])
    n_groups = int(torch.stack(finals).argmin()) + 1
    starts, j = [], n
    for g in range(n_groups - 1, -1, -1):
        j = int(choices[g][j])
        starts.append(j)
    return starts[::-1]


def grouping_objective(sorted_mag: Tensor, starts: list[int], lambda_reg: float) -> float:
    """The objective of a grouping of the 1-D ascending `sorted_mag` given its group starts."""
    a = sorted_mag.double()
    bounds = list(starts) + [a.numel()]
    total = 0.0
    for i, j in zip(bounds[:-1], bounds[1:]):
        seg = a[i:j]
        total += float(group_cost(torch.tensor(float(j - i), dtype=torch.float64), seg.sum(),
                                  (seg * seg).sum(), lambda_reg))
    return total


def _row_rank(row: Tensor, key: Tensor) -> Tensor:
    """Rank of each entry by `key` among the entries of its row (0 = smallest)."""
    order = torch.argsort(key, stable=True)
    order = order[torch.argsort(row[order], stable=True)]  # by row, then by key
    counts = torch.bincount(row)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(row)
    rank[order] = torch.arange(row.numel(), device=row.device) - starts[row[order]]
    return rank


def merge_segments(count: Tensor, total: Tensor, total_sq: Tensor, row: Tensor, max_groups: int,
                   lambda_reg: float) -> Tensor:
    """Greedy merging of adjacent segments, all rows at once.

    Segments are given in order (those of one row contiguous, in ascending magnitude) by their
    count, sum |w|, sum w² (float64) and row index. Returns, per input segment, the index of
    the merged segment it ends in (merged segments numbered in the same order)."""
    n_rows = int(row.max()) + 1
    owner = torch.arange(count.numel(), device=count.device)
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=count.device)
    while count.numel() > 1:
        same_row = row[1:] == row[:-1]
        merged = group_cost(count[:-1] + count[1:], total[:-1] + total[1:],
                            total_sq[:-1] + total_sq[1:], lambda_reg)
        cost = group_cost(count, total, total_sq, lambda_reg)
        inc = torch.where(same_row, merged - cost[:-1] - cost[1:], inf)
        left = torch.cat([inf[None], inc[:-1]])
        right = torch.cat([inc[1:], inf[None]])
        local = (inc < left) & (inc <= right) & same_row
        excess = torch.bincount(row, minlength=n_rows) - max_groups  # per row
        pair_row = row[:-1]
        rank = _row_rank(pair_row, torch.where(local, inc, inf))
        take = local & ((rank < excess[pair_row]) | (inc < 0))
        if not bool(take.any()):
            break
        # segment i+1 joins segment i where pair i is taken
        starts_new = torch.cat([torch.ones(1, dtype=torch.bool, device=count.device), ~take])
        new_index = torch.cumsum(starts_new.long(), 0) - 1
        n_new = int(new_index[-1]) + 1

        def pool(v: Tensor) -> Tensor:
            return torch.zeros(n_new, dtype=v.dtype, device=v.device).index_add_(0, new_index, v)

        count, total, total_sq = pool(count), pool(total), pool(total_sq)
        row = row[starts_new]
        owner = new_index[owner]
    return owner


def group_ids(weight: Tensor, max_groups: int, algorithm: str = "windowed", window: int = 64,
              lambda_reg: float = 0.75, scope: str = "matrix", refine_iters: int = 10, tail: int = 0) -> Tensor:
    """Group index (int64, 0 = smallest magnitudes) of every weight of a 2-D `weight`.

    Groups are numbered per matrix (scope "matrix") or per row (scope "row"), ascending in
    |w|; at most `max_groups` of them (fewer when merging further lowers the objective)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm={algorithm!r}: allowed {ALGORITHMS}")
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}: allowed {SCOPES}")
    mag = weight.detach().abs().float()
    rows = mag.reshape(1, -1) if scope == "matrix" else mag
    # magnitudes in units of their grouping's mean |w|: the objective's lambda/|A| term then means
    # the same on every layer and model (in units of w² it outweighed the errors of small weights,
    # and merges went on below G while the ids still cost ceil(log2 G) bits); the cuts are the same
    # for any scale of the magnitudes otherwise
    rows = rows / rows.mean(dim=1, keepdim=True).clamp_min(torch.finfo(rows.dtype).tiny)
    sorted_mag, order = torch.sort(rows, dim=1)
    n_rows, n = sorted_mag.shape
    if algorithm == "dp":
        cuts = torch.full((n_rows, max_groups + 1), n, dtype=torch.long)
        for r in range(n_rows):
            starts = dp_cuts(sorted_mag[r].cpu(), max_groups, lambda_reg)
            cuts[r, : len(starts)] = torch.tensor(starts)
        cuts = cuts.to(weight.device)
    else:
        width = 1 if algorithm == "greedy" else max(1, int(window))
        cuts = greedy_cuts(sorted_mag, max_groups, width, lambda_reg, tail)
        cuts = refine_cuts(sorted_mag, cuts, lambda_reg, refine_iters)
    positions = torch.arange(n, device=weight.device).expand(n_rows, n)
    ids_sorted = torch.searchsorted(cuts[:, 1:max_groups].contiguous(), positions.contiguous(), right=True)
    ids = torch.empty_like(ids_sorted).scatter_(1, order, ids_sorted)
    return ids.reshape(weight.shape)


def groups_used(ids: Tensor, max_groups: int, scope: str) -> Tensor:
    """How many of the `max_groups` ids occur in each grouping (each row, or the whole matrix)."""
    rows = ids.reshape(1, -1) if scope == "matrix" else ids
    seen = torch.zeros(rows.shape[0], max_groups, dtype=torch.bool, device=ids.device)
    seen.scatter_(1, rows.long(), True)
    return seen.sum(dim=1)


def greedy_cuts(sorted_mag: Tensor, max_groups: int, width: int, lambda_reg: float, tail: int = 0) -> Tensor:
    """Greedy merging from windows of `width` sorted magnitudes (1: singletons), every row at
    once; the `tail` largest magnitudes of each row start as singletons, so that a few outliers
    can end in a group of their own (a window of 64 would bury them in its mean). Returns each
    row's group starts [rows, G+1] (unused groups start at n; last = n)."""
    n_rows, n = sorted_mag.shape
    dev = sorted_mag.device
    tail = min(max(int(tail), 0), n) if width > 1 else 0
    body = n - tail
    # start position (within a row) of every initial segment: windows, then the tail's singletons
    seg_start = torch.cat([torch.arange(0, body, width, device=dev), torch.arange(body, n, device=dev)])
    per_row = seg_start.numel()
    pos = torch.arange(n, device=dev)
    seg_local = torch.where(pos < body, pos // width, (body + width - 1) // width + (pos - body))
    seg = (seg_local[None, :] + per_row * torch.arange(n_rows, device=dev)[:, None]).reshape(-1)
    a = sorted_mag.double().reshape(-1)
    n_seg = n_rows * per_row

    def pool(v: Tensor) -> Tensor:
        return torch.zeros(n_seg, dtype=torch.float64, device=dev).index_add_(0, seg, v)

    seg_row = torch.arange(n_seg, device=dev) // per_row
    owner = merge_segments(pool(torch.ones_like(a)), pool(a), pool(a * a), seg_row, max_groups, lambda_reg)
    n_merged = int(owner.max()) + 1
    # each merged group starts at its first segment; a row's first merged group is its group 0
    first_seg = torch.full((n_merged,), n_seg, dtype=torch.long, device=dev).scatter_reduce(
        0, owner, torch.arange(n_seg, device=dev), reduce="amin")
    group_row = seg_row[first_seg]
    row_first = torch.full((n_rows,), n_merged, dtype=torch.long, device=dev).scatter_reduce(
        0, group_row, torch.arange(n_merged, device=dev), reduce="amin")
    cuts = torch.full((n_rows, max_groups + 1), n, dtype=torch.long, device=dev)
    cuts[group_row, torch.arange(n_merged, device=dev) - row_first[group_row]] = seg_start[first_seg % per_row]
    return cuts


def _cut_stats(prefix: Tensor, cuts: Tensor) -> Tensor:
    """Per group, the difference of a row-wise prefix sum [rows, n+1] between its cuts."""
    at = torch.gather(prefix, 1, cuts)
    return at[:, 1:] - at[:, :-1]


def cuts_objective(s1: Tensor, s2: Tensor, cuts: Tensor, lambda_reg: float) -> Tensor:
    """Per-row objective of the groupings given by `cuts`, from prefix sums of |w| and w²."""
    count = (cuts[:, 1:] - cuts[:, :-1]).double()
    cost = group_cost(count.clamp_min(1), _cut_stats(s1, cuts), _cut_stats(s2, cuts), lambda_reg)
    return torch.where(count > 0, cost, torch.zeros_like(cost)).sum(1)


def refine_cuts(sorted_mag: Tensor, cuts: Tensor, lambda_reg: float, iters: int) -> Tensor:
    """Lloyd steps on the cut points: each cut moves to the midpoint of its neighbouring groups'
    alphas (the L2-optimal cut for fixed alphas); a row keeps a step only if its objective drops.
    Greedy merging alone ends 5-30 % above the exact optimum; this closes most of that gap.
    From prefix sums, one step costs O(rows·G·log n), not O(n)."""
    if iters <= 0:
        return cuts
    n = sorted_mag.shape[1]
    a = sorted_mag.double()
    zero = a.new_zeros(a.shape[0], 1)
    s1, s2 = torch.cat([zero, a.cumsum(1)], 1), torch.cat([zero, (a * a).cumsum(1)], 1)
    best = cuts_objective(s1, s2, cuts, lambda_reg)
    mags = sorted_mag.contiguous()
    for _ in range(iters):
        count = (cuts[:, 1:] - cuts[:, :-1])
        level = _cut_stats(s1, cuts) / count.clamp_min(1).double()
        mid = ((level[:, :-1] + level[:, 1:]) / 2).to(mags.dtype)
        inner = torch.searchsorted(mags, mid.contiguous())  # first weight at or above the midpoint
        inner = torch.where(count[:, 1:] > 0, inner, torch.full_like(inner, n))
        # a group left empty moves to the top (unused groups start at n)
        dup = inner == torch.cat([torch.zeros_like(inner[:, :1]), inner[:, :-1]], 1)
        inner = torch.sort(torch.where(dup, torch.full_like(inner, n), inner), dim=1).values
        candidate = torch.cat([cuts[:, :1], inner, cuts[:, -1:]], 1)
        score = cuts_objective(s1, s2, candidate, lambda_reg)
        better = score < best
        if not bool(better.any()):
            break
        cuts = torch.where(better[:, None], candidate, cuts)
        best = torch.where(better, score, best)
    return cuts


def group_scales(weight: Tensor, ids: Tensor, n_groups: int, scope: str = "matrix") -> Tensor:
    """alpha_g = mean |w| over each group's members: [1, G] (matrix) or [rows, G] (row).
    Differentiable in `weight`; an empty group gets 0 (it holds no weight)."""
    mag = weight.abs()
    if scope == "matrix":
        flat_ids, n_rows = ids.reshape(-1), 1
    else:
        n_rows = weight.shape[0]
        flat_ids = (ids + n_groups * torch.arange(n_rows, device=ids.device)[:, None]).reshape(-1)
    size = n_rows * n_groups
    sums = torch.zeros(size, dtype=mag.dtype, device=mag.device).index_add(0, flat_ids, mag.reshape(-1))
    counts = torch.bincount(flat_ids, minlength=size).to(mag.dtype)
    return (sums / counts.clamp_min(1)).reshape(n_rows, n_groups)


def gather_scales(scales: Tensor, ids: Tensor) -> Tensor:
    """[rows or 1, G] scales looked up by per-weight group ids [out, in] -> [out, in]."""
    return torch.gather(scales.expand(ids.shape[0], -1), 1, ids)


EM_INIT_QUANTILES = (0.25, 0.75)  # the two levels start at these magnitude quantiles of the row


def row_quantiles(x: Tensor, qs: tuple[float, ...]) -> Tensor:
    """Quantiles of each row of x [rows, n] -> [rows, len(qs)], linearly interpolated (torch.quantile's
    default) but through a sort, which has no size limit (torch.quantile refuses > 2^24 elements)."""
    ordered = x.sort(dim=1).values
    pos = torch.tensor(qs, dtype=torch.float64, device=x.device) * (x.shape[1] - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=x.shape[1] - 1)
    frac = (pos - lo).to(x.dtype)
    return ordered[:, lo] + frac * (ordered[:, hi] - ordered[:, lo])


def two_level_em(mag: Tensor, weight: Tensor | None = None, iters: int = 10) -> tuple[Tensor, Tensor, list[Tensor]]:
    """W(1+1)'s weight code (methods.md §6): per row of `mag` = |w| [rows, n], two levels
    alpha_0 <= alpha_1 and a bit per weight, minimising sum_j h_j·(|w_j| − alpha_{g_j})² with
    h = `weight` [n] (the calibration Hessian's diagonal; None: 1). Lloyd/EM: assign each weight to
    the nearer level, set each level to the h-weighted mean of its members; the objective never
    increases. The levels start at the row's 1/4 and 3/4 quantiles of |w| (as methods.md says: a
    start at fractions of the mean puts the split near the mean, which one outlier drags far up).
    Runs until no assignment changes (a fixed point: more iterations change nothing), at most
    `iters` times. Returns (bits bool [rows, n], levels [rows, 2], objective per iteration [rows])."""
    m = mag.double()
    h = torch.ones(m.shape[1], dtype=m.dtype, device=m.device) if weight is None else weight.double().clamp_min(0)
    h = h.expand_as(m)
    levels = row_quantiles(m, EM_INIT_QUANTILES)
    history: list[Tensor] = []
    previous = None
    for _ in range(max(int(iters), 1)):
        bits = m > levels.mean(dim=1, keepdim=True)
        if previous is not None and torch.equal(bits, previous):
            break  # the levels below would be the ones already computed from these bits
        previous = bits
        for k, member in enumerate((~bits, bits)):
            wsum = (h * member).sum(1)
            new = (h * m * member).sum(1) / wsum.clamp_min(1e-30)
            levels[:, k] = torch.where(wsum > 0, new, levels[:, k])  # an empty group keeps its level
        fitted = torch.where(bits, levels[:, 1:], levels[:, :1])
        history.append((h * (m - fitted) ** 2).sum(1))
    # one group left (all weights equal, or all on one side): it is group 0
    empty_low = ~(~bits).any(dim=1)
    bits = bits & ~empty_low[:, None]
    levels[:, 0] = torch.where(empty_low, levels[:, 1], levels[:, 0])
    return bits, levels.to(mag.dtype), history
