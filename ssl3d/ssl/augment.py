"""SSL view generation: random 90-degree rotations and cuboid inpainting corruption.

Same distribution as the Swin UNETR pre-training reference (``rot_rand`` / ``aug_rand`` / ``patch_rand_drop``),
but vectorised on the tensor's device and driven by an explicit ``torch.Generator`` so a run is reproducible.
The reference loops in Python per sample and per cuboid with NumPy's global RNG; here all cuboid geometry of a
batch is drawn at once and the cuboids' voxels are enumerated as one ragged list, so the cost follows the
cuboids' summed volume and there is no host synchronisation per cuboid (a few per pass, for shapes/chunking).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "MaskingParams",
    "MaskingResult",
    "SSLViews",
    "make_views",
    "mask_cuboids",
    "mask_cuboids_detailed",
    "rotate_random",
]

# Upper bound on cuboid voxels x channels painted per chunk: bounds the transient index/noise tensors
# (~60 bytes per voxel) independently of the batch size; a typical 96^3 batch of 4 needs ~0.5M voxels in all.
_PAINT_BUDGET = 1 << 20


@dataclass
class MaskingParams:
    """Cuboid corruption settings, as fractions: of the volume (``max_drop``) and of each axis (block sides)."""

    max_drop: float = 0.3  # per sample, the summed cuboid volume targets uniform(0, max_drop) * H*W*D voxels
    min_block: float = 0.05  # smallest cuboid side (the reference's ``tolr``), fraction of each axis
    max_block: float = 0.25  # largest cuboid side (exclusive bound, as numpy randint), fraction of each axis


@dataclass
class MaskingResult:
    """Everything ``mask_cuboids`` decided, for tests and memory/statistics work.

    ``noise_mask``/``paste_mask`` are the voxels covered by the noise-pass / paste-pass cuboids ([N,H,W,D] bool);
    ``noised`` is the batch after the noise pass (the paste donors); ``donor[i]`` is the sample pasted into
    sample i (== i: no paste pass); ``*_target`` is the summed-volume target in voxels and ``*_volume`` the summed
    volume of the cuboids actually drawn (overlaps counted again, as the reference's stop criterion).
    """

    output: Tensor
    noised: Tensor
    noise_mask: Tensor
    paste_mask: Tensor
    donor: Tensor
    noise_target: Tensor
    noise_volume: Tensor
    paste_target: Tensor
    paste_volume: Tensor


@dataclass
class SSLViews:
    """Two rotated views of a batch: targets for reconstruction, corrupted inputs for the model, rotation labels."""

    views: Tensor  # [2N,C,H,W,D] rotated, uncorrupted (reconstruction targets); view1 rows 0..N-1, view2 N..2N-1
    corrupted: Tensor  # [2N,C,H,W,D] model input
    rot_labels: Tensor  # [2N] int64 in {0,1,2,3}


def _check_generator(x: Tensor, generator: torch.Generator) -> None:
    if generator.device.type != x.device.type:
        raise ValueError(f"generator is on {generator.device}, the tensor on {x.device}: they must share a device")


@torch.no_grad()
def rotate_random(x: Tensor, generator: torch.Generator, *, dims: tuple[int, int] = (3, 4)) -> tuple[Tensor, Tensor]:
    """Rotate each sample by k*90 degrees, k uniform in {0..3}, returning (rotated copy, k as int64 labels).

    ``dims`` are batch-tensor dims; the default (3, 4) is the reference's ``rot90(sample, k, (2, 3))`` on a
    (C,H,W,D) sample. Both dims must have the same size. Done as one gather, no per-sample host sync.
    """
    _check_generator(x, generator)
    if x.dim() != 5:
        raise ValueError(f"expected x of shape [N,C,H,W,D], got {tuple(x.shape)}")
    a, b = (d % 5 for d in dims)
    if a == b or 0 in (a, b) or 1 in (a, b):
        raise ValueError(f"dims must be two distinct spatial dims of [N,C,H,W,D], got {dims}")
    if x.shape[a] != x.shape[b]:
        raise ValueError(f"rotation plane dims {dims} must have equal sizes, got shape {tuple(x.shape)}")
    n, s = x.shape[0], x.shape[a]
    labels = torch.randint(0, 4, (n,), generator=generator, device=x.device)
    # Move the plane last so a flat index over (a, b) addresses it: xp [N, rest, s*s].
    xp = x.movedim((a, b), (-2, -1))
    rest_shape = xp.shape[:-2]
    xp = xp.reshape(n, -1, s * s)
    i = torch.arange(s, device=x.device).view(s, 1)
    j = torch.arange(s, device=x.device).view(1, s)
    r = s - 1
    # torch.rot90(k) from axis a towards axis b: out[i, j] = in[src_i, src_j].
    srcs = torch.stack(
        [
            (i * s + j).expand(s, s),  # k=0
            (j * s + (r - i)).expand(s, s),  # k=1: in[j, s-1-i]
            ((r - i) * s + (r - j)).expand(s, s),  # k=2: in[s-1-i, s-1-j]
            ((r - j) * s + i).expand(s, s),  # k=3: in[s-1-j, i]
        ]
    ).reshape(4, s * s)
    idx = srcs[labels].view(n, 1, s * s).expand(n, xp.shape[1], s * s)
    out = xp.gather(2, idx).reshape(*rest_shape, s, s).movedim((-2, -1), (a, b)).contiguous()
    return out, labels


def _axis_limits(size: int, params: MaskingParams) -> tuple[int, int, int]:
    """(start upper bound, side lower bound, side upper bound), all numpy-randint style (exclusive upper).

    Matches the reference for sizes where int(min_block * size) >= 1 (any axis >= 20 at the defaults); the
    lower side bound is clamped to 1 so the loop always progresses, and a degenerate side range (numpy would
    raise) becomes the fixed side ``lo``.
    """
    lo = max(int(params.min_block * size), 1)
    hi = max(int(params.max_block * size), lo + 1)
    return max(size - lo, 1), lo, hi


def _window_size(shape: tuple[int, ...], params: MaskingParams) -> tuple[int, int, int]:
    """Largest possible cuboid side per axis (randint's exclusive upper bound minus one)."""
    return tuple(_axis_limits(sz, params)[2] - 1 for sz in shape)


def _draw_cuboids(
    n: int, shape: tuple[int, int, int], target: Tensor, params: MaskingParams, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Draw cuboids for all samples until each one's summed volume reaches its target (the reference's loop).

    Geometry for the whole batch is drawn in chunks sized so one chunk almost always suffices (one host sync
    each); cuboid k of a sample is kept iff the volume of its earlier cuboids is still below the target.
    Returns the kept cuboids as a flat list in sample-major, draw order: sample [M], start [M,3], side [M,3]
    (clipped at the volume's end), and the summed kept volume per sample [N].
    """
    device = target.device
    lims = [_axis_limits(sz, params) for sz in shape]
    mean_vol = math.prod((lo + hi - 1) / 2 for _, lo, hi in lims)
    chunk = math.ceil(1.5 * params.max_drop * math.prod(shape) / mean_vol) + 8
    dims_t = torch.tensor(shape, device=device)
    starts, sides = [], []
    total = torch.zeros(n, dtype=torch.float64, device=device)
    while bool((total < target).any()):
        st = torch.stack(
            [torch.randint(0, s_hi, (n, chunk), generator=generator, device=device) for s_hi, _, _ in lims], -1
        )
        ln = torch.stack(
            [torch.randint(lo, hi, (n, chunk), generator=generator, device=device) for _, lo, hi in lims], -1
        )
        ln = torch.minimum(ln, dims_t - st)  # end = min(start + side, size)
        starts.append(st)
        sides.append(ln)
        total = total + ln.prod(-1).sum(1)
    if not starts:
        empty = torch.zeros(0, 3, dtype=torch.int64, device=device)
        return empty[:, 0], empty, empty, torch.zeros(n, dtype=torch.float64, device=device)
    st, ln = torch.cat(starts, 1), torch.cat(sides, 1)
    vol = ln.prod(-1)
    keep = (vol.cumsum(1) - vol) < target[:, None]
    drawn = (vol * keep).sum(1).to(torch.float64)
    samp, k = keep.nonzero(as_tuple=True)  # row-major: sample-major, draw order within a sample
    return samp, st[samp, k], ln[samp, k], drawn


def _chunks(vol: list[int], budget: int) -> list[tuple[int, int]]:
    """Consecutive cuboid ranges [m0, m1) whose summed volume stays within budget (at least one cuboid each)."""
    bounds, start, acc = [], 0, 0
    for m, v in enumerate(vol):
        if m > start and acc + v > budget:
            bounds.append((start, m))
            start, acc = m, 0
        acc += v
    if start < len(vol):
        bounds.append((start, len(vol)))
    return bounds


def _voxels(
    samp: Tensor, st: Tensor, ln: Tensor, shape: tuple[int, int, int], m0: int, m1: int, lines: int, count: int
) -> tuple[Tensor, Tensor]:
    """Every voxel of cuboids m0..m1-1 (``lines`` d-rows, ``count`` voxels in all), cuboid by cuboid, C-order.

    Returns (flat index sample*V + voxel, cuboid id m), each [count] int64. Two ragged expansions with
    ``repeat_interleave(output_size=...)`` (cuboids -> d-rows -> voxels), so the work is the cuboids' volume,
    the per-voxel work is a gather and an add, and there is no host sync.
    """
    _, w, d = shape
    dev = st.device
    st, ln = st[m0:m1], ln[m0:m1]
    k = m1 - m0
    n_rows = ln[:, 0] * ln[:, 1]
    row_cub = torch.repeat_interleave(torch.arange(k, device=dev), n_rows, output_size=lines)
    row_in_cub = torch.arange(lines, device=dev) - (n_rows.cumsum(0) - n_rows).index_select(0, row_cub)
    side_w = ln[:, 1].index_select(0, row_cub)
    base = samp[m0:m1] * math.prod(shape) + (st[:, 0] * w + st[:, 1]) * d + st[:, 2]
    row_start = base.index_select(0, row_cub) + (row_in_cub // side_w) * (w * d) + (row_in_cub % side_w) * d
    row_len = ln[:, 2].index_select(0, row_cub)
    # flat = row_start[row] + (position - first position of the row), folded into one gather.
    row_start -= row_len.cumsum(0) - row_len
    vox_row = torch.repeat_interleave(torch.arange(lines, device=dev), row_len, output_size=count)
    flat = row_start.index_select(0, vox_row).add_(torch.arange(count, device=dev))
    cid = torch.repeat_interleave(torch.arange(m0, m1, device=dev), ln.prod(-1), output_size=count)
    return flat, cid


def _paint_noise(
    x: Tensor,
    samp: Tensor,
    st: Tensor,
    ln: Tensor,
    generator: torch.Generator,
    budget: int = _PAINT_BUDGET,
) -> tuple[Tensor, Tensor]:
    """Paint a list of cuboids (sample [M], start [M,3], side [M,3]) with noise; later ones overwrite earlier ones.

    Works on consecutive chunks of the list, vectorised over every voxel of the chunk: a voxel's winner is the
    latest cuboid covering it (scatter amax of the cuboid id; ids only grow across chunks, which are painted in
    order), so the result equals painting one cuboid after the other. Noise per chunk is randn([voxels, C]) in
    fp32, min-max normalised over each cuboid's voxels and channels together, as the reference.
    Returns (painted copy of x, covered mask [N,H,W,D]).
    """
    n, c = x.shape[:2]
    shape = tuple(x.shape[2:])
    v = math.prod(shape)
    dev = x.device
    # One spare element at the end of the flat buffer swallows the writes of voxels that a later cuboid covers.
    trash = n * c * v
    buf = torch.empty(trash + 1, dtype=x.dtype, device=dev)
    buf[:-1].copy_(x.reshape(-1))
    owner = torch.full((n * v,), -1, dtype=torch.int64, device=dev)
    chan = torch.arange(c, device=dev) * v
    sides = ln.tolist()  # one host sync: sizes of the ragged expansions and the chunking
    vol = [a * b * e for a, b, e in sides]
    for m0, m1 in _chunks(vol, max(1, budget // c)):
        count = sum(vol[m0:m1])
        flat, cid = _voxels(samp, st, ln, shape, m0, m1, sum(a * b for a, b, _ in sides[m0:m1]), count)
        owner.scatter_reduce_(0, flat, cid, reduce="amax")
        wins = owner.index_select(0, flat) == cid
        noise = torch.randn((count, c), generator=generator, device=dev, dtype=torch.float32)
        rel = cid.sub_(m0)
        lo = noise.new_full((m1 - m0,), math.inf).scatter_reduce_(0, rel, noise.amin(1), reduce="amin")
        hi = noise.new_full((m1 - m0,), -math.inf).scatter_reduce_(0, rel, noise.amax(1), reduce="amax")
        # A one-voxel single-channel cuboid (reference: 0/0 = NaN) becomes 0 instead.
        inv = (hi - lo).clamp_min(torch.finfo(torch.float32).tiny).reciprocal_()
        noise = noise.sub_(lo.index_select(0, rel)[:, None]).mul_(inv.index_select(0, rel)[:, None]).clamp_(0.0, 1.0)
        # Index in buf: (n*C + c)*V + voxel = flat + n*(C-1)*V + c*V.
        if c > 1:
            flat = (flat + flat.div(v, rounding_mode="floor") * ((c - 1) * v))[:, None] + chan
        bidx = torch.where(wins.view(-1, 1), flat.view(count, -1), trash)
        buf.scatter_(0, bidx.reshape(-1), noise.to(x.dtype).reshape(-1))
    return buf[:-1].view(x.shape), (owner >= 0).view(n, *shape)


def _noise_pass(x: Tensor, generator: torch.Generator, params: MaskingParams) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Noise pass of the reference's ``aug_rand``. Returns (output, covered mask [N,H,W,D], target, drawn volume)."""
    n = x.shape[0]
    shape = tuple(x.shape[2:])
    target = torch.rand(n, dtype=torch.float64, generator=generator, device=x.device)
    target = target * (params.max_drop * math.prod(shape))
    samp, st, ln, drawn = _draw_cuboids(n, shape, target, params, generator)
    out, covered = _paint_noise(x, samp, st, ln, generator)
    return out, covered, target, drawn


def _paste_pass(
    noised: Tensor, generator: torch.Generator, params: MaskingParams
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Copy cuboids from a random other sample (j == i: untouched) of the noise-corrupted batch.

    Every cuboid of sample i copies from the same donor at the same place, so overlaps need no ordering: the
    result is the union mask filled from the donor. Returns (output, mask, donor, target, drawn volume).
    """
    n = noised.shape[0]
    shape = tuple(noised.shape[2:])
    v = math.prod(shape)
    dev = noised.device
    donor = torch.randint(0, n, (n,), generator=generator, device=dev)
    target = torch.rand(n, dtype=torch.float64, generator=generator, device=dev) * (params.max_drop * v)
    target = torch.where(donor != torch.arange(n, device=dev), target, 0.0)
    samp, st, ln, drawn = _draw_cuboids(n, shape, target, params, generator)
    covered = torch.zeros(n * v, dtype=torch.bool, device=dev)
    sides = ln.tolist()
    vol = [a * b * e for a, b, e in sides]
    for m0, m1 in _chunks(vol, _PAINT_BUDGET):
        lines = sum(a * b for a, b, _ in sides[m0:m1])
        flat, _ = _voxels(samp, st, ln, shape, m0, m1, lines, sum(vol[m0:m1]))
        covered[flat] = True
    mask = covered.view(n, *shape)
    out = torch.where(mask.unsqueeze(1), noised[donor], noised) if vol else noised.clone()
    return out, mask, donor, target, drawn


@torch.no_grad()
def mask_cuboids_detailed(
    x: Tensor, generator: torch.Generator, params: MaskingParams = MaskingParams()
) -> MaskingResult:
    """``mask_cuboids`` plus its masks, donors and volumes, so tests and memory work can check the statistics."""
    _check_generator(x, generator)
    if x.dim() != 5:
        raise ValueError(f"expected x of shape [N,C,H,W,D], got {tuple(x.shape)}")
    noised, noise_mask, noise_target, noise_volume = _noise_pass(x, generator, params)
    out, paste_mask, donor, paste_target, paste_volume = _paste_pass(noised, generator, params)
    return MaskingResult(
        output=out,
        noised=noised,
        noise_mask=noise_mask,
        paste_mask=paste_mask,
        donor=donor,
        noise_target=noise_target,
        noise_volume=noise_volume,
        paste_target=paste_target,
        paste_volume=paste_volume,
    )


def mask_cuboids(x: Tensor, generator: torch.Generator, params: MaskingParams = MaskingParams()) -> Tensor:
    """Corrupt each sample for inpainting: noise cuboids, then (prob. (N-1)/N) cuboids pasted from another sample.

    The paste donors are the noise-corrupted batch. Returns a new tensor; ``x`` is not modified.
    """
    return mask_cuboids_detailed(x, generator, params).output


@torch.no_grad()
def make_views(x: Tensor, generator: torch.Generator, params: MaskingParams = MaskingParams()) -> SSLViews:
    """Two independently rotated views of x and their corrupted copies (each view masked within its own batch,
    as the reference's two ``aug_rand`` calls, so paste donors never come from the other view)."""
    x1, k1 = rotate_random(x, generator)
    x2, k2 = rotate_random(x, generator)
    c1 = mask_cuboids(x1, generator, params)
    c2 = mask_cuboids(x2, generator, params)
    return SSLViews(views=torch.cat([x1, x2]), corrupted=torch.cat([c1, c2]), rot_labels=torch.cat([k1, k2]))
