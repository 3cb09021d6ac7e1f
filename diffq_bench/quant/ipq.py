"""Quant-Noise with iterative product quantization (Fan, Stock et al., ICLR 2021; Stock et al. 2020).

Phases, driven by the generic hooks of :class:`~diffq_bench.quant.base.BaseQuantizer`
(``on_epoch_end`` / ``finalize``, see docs/INTERFACES.md "Multi-phase quantizers"):

1. **Block noise** (first ``noise_frac`` of the epochs): each train forward drops whole blocks
   with probability ``p`` and rescales the kept ones by ``1/(1 − p)``; a block is ``block_size``
   consecutive input columns of a row for a Linear/Embedding-like weight, the whole kernel of an
   (out, in) pair for a k×k conv. The gradient reaches every weight (straight-through) and the
   stored weight is never overwritten (the official hook zeroes ``weight.data`` cumulatively).
2. **iPQ, stage by stage** (the rest of the epochs, evenly split): at each stage's epoch boundary
   the weights matching the stage's fnmatch patterns are replaced by ``K`` centroids (k-means on
   their blocks) + one assignment per block. From then on the layer's weight is
   ``centroids[assignments]``: the centroids are trainable (fine-tuned with the rest of the model,
   each receives the summed gradient of its blocks), the assignments are fixed, the float weight
   is frozen. Parameters matched by no stage are quantized with the last stage. As in Stock et
   al. (2020), a centroid is updated with the mean gradient of its blocks (not their sum).

Eval always shows the truly quantized model, bit for bit what :meth:`export` stores: layers not
quantized yet are shown (and exported) through a k-means of their current weight, cached until the
weight changes. Export: fp16 centroids (or int8 + per-layer scale/zero point with
``int8_centroids``) and assignments packed on ``ceil(log2 K)`` bits.

Which weights: 2-D+ tensors only; a 2-D (or 1×1 conv) weight whose input size is not divisible by
``block_size`` is left in float (listed in :attr:`QuantNoiseIPQQuantizer.skipped`, warned once),
and so are 1-D tensors (biases, norms: no blocks to split, silently, as for ``min_size``).
"""
from __future__ import annotations

import fnmatch
import logging
import math
import typing as tp
import zlib

import torch
from torch import nn

from .base import BaseQuantizer, Calibration, Display, QParam
from .errors import QuantizerError, check_range
from .pack import pack_uint, unpack_uint
from .quant_noise import affine_params, dequantize, quantize_levels

logger = logging.getLogger(__name__)
INITS = ("kmeans++", "random")
_CHUNK = 4096  # rows per distance block: bounds memory at _CHUNK x K floats, stays in cache
_INIT_SAMPLE = 128  # kmeans++ seeds from at most this many points per centroid (Lloyd uses all)


# ------------------------------------------------------------------------------------- k-means
def _assign(x: torch.Tensor, centroids: torch.Tensor) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each row of ``x`` and the squared distance to it (chunked matmul)."""
    c_norm = (centroids * centroids).sum(1)
    assign, dist = [], []
    for start in range(0, x.shape[0], _CHUNK):
        chunk = x[start:start + _CHUNK]
        # |x|^2 does not change the argmin: add it to the winner only.
        best, idx = torch.addmm(c_norm, chunk, centroids.t(), alpha=-2).min(dim=1)
        assign.append(idx)
        dist.append((best + (chunk * chunk).sum(1)).clamp(min=0))
    return torch.cat(assign), torch.cat(dist)


def _init_centroids(x: torch.Tensor, k: int, init: str, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    if init == "random":
        return x[torch.randperm(n, generator=gen)[:k].to(x.device)].clone()
    # kmeans++: each new centroid is a point drawn with probability ∝ D(x)^2, among a random
    # subsample for big layers (seeding is O(N·K·D) and sequential; Lloyd then sees every point).
    if n > _INIT_SAMPLE * k:
        x = x[torch.randperm(n, generator=gen)[:_INIT_SAMPLE * k].to(x.device)]
        n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centroids = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        cum = torch.cumsum(d2.double(), 0)
        total = float(cum[-1])
        if total <= 0:  # every point already coincides with a centroid: any point will do
            idx = int(torch.randint(n, (1,), generator=gen))
        else:
            target = torch.rand((1,), generator=gen, dtype=torch.float64).to(x.device) * total
            idx = min(int(torch.searchsorted(cum, target)), n - 1)
        centroids.append(x[idx])
        d2 = torch.minimum(d2, ((x - x[idx]) ** 2).sum(1))
    return torch.stack(centroids).clone()


def kmeans(x: torch.Tensor, k: int, n_iter: int = 20, init: str = "kmeans++", seed: int = 0
           ) -> tp.Tuple[torch.Tensor, torch.Tensor, tp.List[float]]:
    """Lloyd's k-means on the rows of ``x``, vectorized, seeded, with empty-cluster re-seeding.

    An empty cluster takes a random point of the currently largest cluster (that point's error
    drops to 0, so the reconstruction error never increases).

    Args:
        x: ``[N, D]`` points (any float dtype; computed in float32).
        k: number of centroids, 1..N.
        n_iter: maximum Lloyd iterations (stops early when the assignments stop changing).
        init: ``kmeans++`` or ``random`` (K distinct points).
        seed: seed of the private generator (the global RNG is left untouched).
    Returns:
        ``centroids [k, D]`` (float32), ``assignments [N]`` (int64) and the mean squared
        reconstruction error after the initialisation and after each iteration.
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise QuantizerError(f"kmeans expects a non-empty [N, D] tensor, got shape {tuple(x.shape)}")
    check_range("k", k, 1, x.shape[0], integer=True)
    check_range("n_iter", n_iter, 0, 10 ** 6, integer=True)
    if init not in INITS:
        raise QuantizerError(f"unknown k-means init {init!r}; valid: {', '.join(INITS)}")
    gen = torch.Generator().manual_seed(int(seed))
    x = x.detach().float()
    centroids = _init_centroids(x, int(k), init, gen)
    assign, dist = _assign(x, centroids)
    errors = [float(dist.mean())]
    for _ in range(n_iter):
        counts = torch.bincount(assign, minlength=k)
        for empty in torch.nonzero(counts == 0).flatten().tolist():
            largest = int(counts.argmax())
            members = torch.nonzero(assign == largest).flatten()
            pick = members[int(torch.randint(members.numel(), (1,), generator=gen))]
            centroids[empty] = x[pick]
            assign[pick] = empty
            counts[largest] -= 1
            counts[empty] = 1
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        centroids = sums / counts.clamp(min=1).unsqueeze(1).to(x.dtype)
        new_assign, dist = _assign(x, centroids)
        errors.append(float(dist.mean()))
        converged = bool(torch.equal(new_assign, assign))
        assign = new_assign
        if converged:
            break
    return centroids, assign, errors


# -------------------------------------------------------------------------------- quantizer
def block_dim(shape: tp.Sequence[int], block_size: int) -> tp.Optional[int]:
    """Length of a PQ block for a weight of ``shape``, or None when it cannot be split.

    The blocks are then simply ``weight.reshape(-1, D)``: row-major order makes them consecutive
    input columns (Linear, Embedding, 1×1 conv) or whole kernels (k×k conv).
    """
    if len(shape) < 2:
        return None
    kernel = math.prod(shape[2:])
    if kernel > 1:
        return kernel
    return block_size if shape[1] % block_size == 0 else None


class QuantNoiseIPQQuantizer(BaseQuantizer):
    """Block Quant-Noise training followed by staged iterative product quantization.

    Args:
        model: the model to quantize.
        p: block drop probability during noise training, in [0, 1) (paper: 0.05–0.2).
        block_size: PQ block length for Linear-like weights (conv k×k blocks are kernels).
        block_sizes: per-parameter block lengths, ``{name part: length}``: the first key contained in
            the parameter's name wins, as fairseq's ``fuzzy_name`` (its LM: ``{fc: 8, attn: 4,
            embed: 4}``); others: block_size.
        n_centroids: K, centroids per layer, 2..65536 (capped at the layer's number of blocks).
        n_iter: k-means iterations.
        init: k-means init, ``kmeans++`` or ``random``.
        stages: list of stages, each a list of fnmatch patterns on parameter names (a plain
            string is a one-pattern stage); e.g. ``[["*ffn*"], ["*embed*"], ["*attn*"]]``.
        noise_frac: fraction of the epochs trained with block noise before the first stage.
        int8_centroids: store centroids as int8 + per-layer scale (iPQ & int8) instead of fp16.
        seed: seed of the k-means generators (each layer's seed also depends on its name).
        min_size: parameters of at most this many MiB (float32) stay in float.
        float16: store the parameters left in float as float16.
        exclude: fnmatch patterns of parameter names never quantized.
    """
    independent_noise = True  # noise / masks drawn independently on each process (docs/cluster.md)
    name = "quant_noise_ipq"
    display = Display("Quant-Noise iPQ", color="tab:brown", axes=(
        ("quant.n_centroids", "K={}"), ("quant.block_size", "block {}"), ("quant.p", "p={}")))
    config_keys = ("p", "block_size", "block_sizes", "n_centroids", "n_iter", "init", "stages", "noise_frac",
                   "int8_centroids", "seed", "min_size", "float16", "exclude")

    def __init__(self, model: nn.Module, p: float = 0.1, block_size: int = 8,
                 block_sizes: tp.Optional[tp.Mapping[str, int]] = None, n_centroids: int = 256,
                 n_iter: int = 20, init: str = "kmeans++",
                 stages: tp.Sequence[tp.Any] = (("*",),), noise_frac: float = 0.5,
                 int8_centroids: bool = False, seed: int = 0, min_size: float = 0.01,
                 float16: bool = False, exclude: tp.Sequence[str] = ()):
        check_range("p", p, 0.0, 0.999)
        check_range("block_size", block_size, 1, 4096, integer=True)
        self.block_sizes = {str(pat): int(size) for pat, size in (block_sizes or {}).items()}
        for pat, size in self.block_sizes.items():
            check_range(f"block_sizes[{pat!r}]", size, 1, 4096, integer=True)
        check_range("n_centroids", n_centroids, 2, 2 ** 16, integer=True)
        check_range("n_iter", n_iter, 0, 10 ** 4, integer=True)
        check_range("noise_frac", noise_frac, 0.0, 1.0)
        if init not in INITS:
            raise QuantizerError(f"init must be one of {', '.join(INITS)}, got {init!r}")
        if isinstance(stages, str) or not stages:
            raise QuantizerError(f"stages must be a non-empty list of pattern lists, got {stages!r}")
        self.stages = [[s] if isinstance(s, str) else [str(pat) for pat in s] for s in stages]
        if any(not stage for stage in self.stages):
            raise QuantizerError(f"every stage needs at least one pattern, got {stages!r}")
        self.p, self.block_size, self.n_centroids = float(p), int(block_size), int(n_centroids)
        self.n_iter, self.init, self.noise_frac = int(n_iter), init, float(noise_frac)
        self.int8_centroids, self.seed = bool(int8_centroids), int(seed)
        self.skipped: tp.Dict[str, str] = {}
        self.done_stages = 0
        self.centroids: tp.Dict[str, nn.Parameter] = {}  # quantized layers: trainable centroids
        self.assignments: tp.Dict[str, torch.Tensor] = {}
        self._cache: tp.Dict[str, tp.Tuple[tp.Any, torch.Tensor, torch.Tensor]] = {}
        super().__init__(model, min_size=min_size, float16=float16, exclude=exclude)
        if self.skipped:
            logger.warning("quant_noise_ipq leaves in float (no PQ blocks): %s",
                           "; ".join(f"{k} ({v})" for k, v in self.skipped.items()))
        used = {self.stage_of(qp) for qp in self.qparams}
        for index, patterns in enumerate(self.stages):
            if index not in used:  # most likely a typo in a pattern: say so, the run goes on
                logger.warning("quant_noise_ipq stage %d %s matches no quantized parameter",
                               index + 1, patterns)

    # ------------------------------------------------------------------------------ layout
    def _accepts(self, name: str, module: nn.Module, attr: str, param: nn.Parameter) -> bool:
        if not super()._accepts(name, module, attr, param):
            return False
        if param.dim() < 2:  # biases, norms: no blocks, and tiny; float like min_size ones
            return False
        if block_dim(param.shape, self.block_size_of(name)) is None:
            self.skipped[name] = (f"shape {tuple(param.shape)}: input size {param.shape[1]} not "
                                  f"divisible by its block_size {self.block_size_of(name)}")
            return False
        return True

    def block_size_of(self, name: str) -> int:
        """The block length of parameter ``name``: the first ``block_sizes`` key it contains
        (fairseq's per-layer sizes: FFN 8, attention 4, embeddings 4), else ``block_size``."""
        for part, size in self.block_sizes.items():
            if part in name:
                return size
        return self.block_size

    def _k(self, qp: QParam) -> tp.Tuple[int, int, int]:
        """(block length D, number of blocks N, effective K = min(n_centroids, N))."""
        dim = block_dim(qp.param.shape, self.block_size_of(qp.name))
        assert dim is not None
        count = qp.param.numel() // dim
        return dim, count, min(self.n_centroids, count)

    def stage_of(self, qp: QParam) -> int:
        """Index of the first stage whose patterns match ``qp`` (the last stage if none does)."""
        for index, patterns in enumerate(self.stages):
            if any(fnmatch.fnmatch(qp.name, pat) for pat in patterns):
                return index
        return len(self.stages) - 1

    # ----------------------------------------------------------------------- centroid storage
    def _stored(self, centroids: torch.Tensor) -> torch.Tensor:
        """Centroids as export stores them (fp16 or int8), dequantized to float32, no grad."""
        c = centroids.detach().float()
        if self.int8_centroids:
            scale, zero = affine_params(c, 8, "tensor")
            return dequantize(quantize_levels(c, scale, zero, 8), scale, zero)
        return c.half().float()

    def _pq_state(self, qp: QParam) -> tp.Tuple[torch.Tensor, torch.Tensor]:
        """(centroids, assignments): the live ones, or a k-means of the current float weight."""
        if qp.name in self.centroids:
            return self.centroids[qp.name], self.assignments[qp.name]
        weight = qp.param
        # _version misses writes through ``.data``: a cheap content fingerprint catches those.
        with torch.no_grad():
            w = weight.detach().float()
            fingerprint = tuple(torch.stack([w.sum(), (w * w).sum(), w.abs().max()]).tolist())
        key = (weight._version, weight.data_ptr(), str(weight.device), fingerprint)
        cached = self._cache.get(qp.name)
        if cached is None or cached[0] != key:
            dim, _, k = self._k(qp)
            seed = self.seed * 1_000_003 + zlib.crc32(qp.name.encode())
            centroids, assign, _ = kmeans(weight.detach().reshape(-1, dim), k, self.n_iter,
                                          self.init, seed)
            cached = (key, centroids, assign)
            self._cache[qp.name] = cached
        return cached[1], cached[2]

    # ---------------------------------------------------------------------------- forwards
    def _train_value(self, qp: QParam) -> torch.Tensor:
        if qp.name in self.centroids:
            centroids, assign = self.centroids[qp.name], self.assignments[qp.name]
            if self.int8_centroids:  # fine-tune through the int8 rounding (straight-through)
                centroids = centroids + (self._stored(centroids) - centroids).detach()
            if centroids.requires_grad:
                # Stock et al. 2020: a codeword moves by the *mean* gradient of its blocks
                # (autograd through the gather would sum them: lr would scale with cluster size).
                counts = torch.bincount(assign, minlength=centroids.shape[0]).clamp(min=1)
                centroids = centroids.view_as(centroids)
                centroids.register_hook(lambda g: g / counts.unsqueeze(1).to(g.dtype))
            return centroids[assign].reshape(qp.param.shape)
        weight = qp.param
        if self.p <= 0:
            return weight
        dim, count, _ = self._k(qp)
        keep = (torch.rand(count, 1, device=weight.device) >= self.p).to(weight.dtype)
        noisy = (weight.detach().reshape(count, dim) * keep / (1 - self.p)).reshape(weight.shape)
        return weight + (noisy - weight.detach())  # gradient reaches all weights

    def _eval_value(self, qp: QParam) -> torch.Tensor:
        centroids, assign = self._pq_state(qp)
        return self._stored(centroids)[assign].reshape(qp.param.shape).to(qp.param.dtype)

    # ------------------------------------------------------------------------------ phases
    @property
    def phase(self) -> str:
        return "noise" if self.done_stages == 0 else f"ipq:{self.done_stages}/{len(self.stages)}"

    def stage_epochs(self, total_epochs: int) -> tp.List[int]:
        """0-based epoch after which each stage is quantized (may be < 0: at the first hook)."""
        rest = (1 - self.noise_frac) * total_epochs / len(self.stages)
        return [math.floor(self.noise_frac * total_epochs + i * rest + 1e-9) - 1
                for i in range(len(self.stages))]

    def quantize_stage(self, index: int) -> None:
        """Replace the weights of stage ``index`` by k-means centroids + assignments."""
        for qp in self.qparams:
            if self.stage_of(qp) != index or qp.name in self.centroids:
                continue
            centroids, assign = self._pq_state(qp)
            self.centroids[qp.name] = nn.Parameter(centroids.detach().clone().to(qp.param.dtype))
            self.assignments[qp.name] = assign.detach().clone()
            self._cache.pop(qp.name, None)
            qp.param.requires_grad_(False)  # the weight is now a function of the centroids

    def _advance(self, target: int) -> bool:
        start = self.done_stages
        while self.done_stages < min(target, len(self.stages)):
            logger.info("quant_noise_ipq: quantizing stage %d/%d %s", self.done_stages + 1,
                        len(self.stages), self.stages[self.done_stages])
            self.quantize_stage(self.done_stages)
            self.done_stages += 1
        return self.done_stages > start

    def on_epoch_end(self, epoch: int, total_epochs: int) -> bool:
        due = sum(1 for e in self.stage_epochs(total_epochs) if e <= epoch)
        return self._advance(due)

    def finalize(self, calibration: tp.Optional[Calibration] = None) -> bool:
        """Quantize every stage not reached yet (no calibration data needed)."""
        return self._advance(len(self.stages))

    def quantizer_parameters(self) -> tp.List[nn.Parameter]:
        return [self.centroids[qp.name] for qp in self.qparams if qp.name in self.centroids]

    def setup_optimizer(self, optimizer: torch.optim.Optimizer, lr: tp.Optional[float] = None,
                        separate_adam: bool = False, **kwargs: tp.Any
                        ) -> tp.List[torch.optim.Optimizer]:
        """Centroids are weights: they join the main optimizer at its lr (no weight decay)."""
        params = self.quantizer_parameters()
        if params:
            lr = optimizer.defaults["lr"] if lr is None else lr
            optimizer.add_param_group({"params": params, "lr": lr, "weight_decay": 0.0, **kwargs})
        return []

    def state_dict(self) -> tp.Dict[str, tp.Any]:
        return {"done_stages": self.done_stages,
                "centroids": {k: v.detach().cpu().clone() for k, v in self.centroids.items()},
                "assignments": {k: v.cpu().clone() for k, v in self.assignments.items()}}

    def load_state_dict(self, state: tp.Dict[str, tp.Any]) -> None:
        if not isinstance(state, dict) or "done_stages" not in state:
            raise QuantizerError("not a quant_noise_ipq quantizer state (no 'done_stages'): "
                                 "was the checkpoint written by another method?")
        by_name = {qp.name: qp for qp in self.qparams}
        unknown = set(state.get("centroids", {})) - set(by_name)
        if unknown:
            raise QuantizerError(f"iPQ state names parameters this model does not quantize: "
                                 f"{sorted(unknown)}")
        for name in self.centroids:  # back to the float weight for layers the state lacks
            by_name[name].param.requires_grad_(True)
        self.centroids, self.assignments, self._cache = {}, {}, {}
        for name, centroids in state.get("centroids", {}).items():
            qp = by_name[name]
            dim, count, k = self._k(qp)
            assign = state["assignments"][name]
            if tuple(centroids.shape) != (k, dim) or tuple(assign.shape) != (count,):
                raise QuantizerError(
                    f"iPQ state for {name!r} has centroids {tuple(centroids.shape)} / assignments "
                    f"{tuple(assign.shape)}, expected ({k}, {dim}) / ({count},)")
            self.centroids[name] = nn.Parameter(centroids.to(qp.param.device, qp.param.dtype))
            self.assignments[name] = assign.to(qp.param.device).long()
            qp.param.requires_grad_(False)
        self.done_stages = int(state.get("done_stages", 0))

    # ------------------------------------------------------------------------------ export
    def _export_param(self, qp: QParam) -> tp.Dict[str, tp.Any]:
        centroids, assign = self._pq_state(qp)
        dim, count, k = self._k(qp)
        nbits = max(1, math.ceil(math.log2(k)))
        entry: tp.Dict[str, tp.Any] = {"shape": list(qp.param.shape), "block": dim, "count": count,
                                       "nbits": nbits, "assign": pack_uint(assign.cpu(), nbits)}
        c = centroids.detach().float()
        if self.int8_centroids:
            scale, zero = affine_params(c, 8, "tensor")
            entry.update(c_levels=pack_uint(quantize_levels(c, scale, zero, 8).cpu(), 8),
                         c_scale=scale.cpu(), c_zero=int(zero), k=k)
        else:
            entry["centroids"] = c.half().cpu()
        return entry

    @classmethod
    def _restore_param(cls, entry: tp.Dict[str, tp.Any], like: torch.Tensor) -> torch.Tensor:
        dim, count, nbits = int(entry["block"]), int(entry["count"]), int(entry["nbits"])
        check_range("nbits", nbits, 1, 16, integer=True)
        if "c_levels" in entry:
            k = int(entry["k"])
            levels = unpack_uint(entry["c_levels"], 8, k * dim).reshape(k, dim)
            centroids = dequantize(levels, entry["c_scale"].float(),
                                   torch.tensor([int(entry["c_zero"])]))
        else:
            centroids = entry["centroids"].float()
        assign = unpack_uint(entry["assign"], nbits, count)
        if int(assign.max()) >= centroids.shape[0]:
            raise QuantizerError(f"iPQ entry has assignment {int(assign.max())} >= "
                                 f"{centroids.shape[0]} centroids: corrupt state")
        return centroids[assign].reshape([int(s) for s in entry["shape"]]).to(like.dtype)

    def _param_bits(self, qp: QParam) -> torch.Tensor:
        dim, count, k = self._k(qp)
        nbits = max(1, math.ceil(math.log2(k)))
        centroid_bits = k * dim * 8 + 32 + 8 if self.int8_centroids else k * dim * 16
        return torch.tensor(float(centroid_bits + count * nbits))
