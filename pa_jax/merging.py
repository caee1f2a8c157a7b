"""Weight-space merged references: pi_alpha = base + alpha * tau, tau a (merged) task vector.

The paper asks which reference to divide by when the pre-RL checkpoint is unknown or far away (its
Figure 5 sweeps alpha). A merged reference moves the reference toward the policy in weight space:

    theta_alpha = theta_base + alpha * tau,     tau_i = theta_i - theta_base   (task vector of member i)

with alpha = 0 the base and, for ``linear``, alpha = 1 the policy. Five methods (the authors' set,
``pa/merging.py::MERGE_METHODS`` of deeplearning-wisc/progress-advantage):

* ``linear`` (task arithmetic, Ilharco et al. 2023): theta_alpha = (1 - alpha) theta_base + alpha theta_policy,
  which is theta_base + alpha tau written so that alpha = 0 and alpha = 1 reproduce the sources bit for bit;
* ``ties`` (TIES-Merging, Yadav et al. 2023): trim each tau_i to its top-k magnitudes, elect a sign per
  coordinate by summed mass, average the agreeing entries (disjoint mean);
* ``dare_linear`` / ``dare_ties`` (DARE, Yu et al. 2024): drop each coordinate of each tau_i with probability
  p = 1 - density, rescale the survivors by 1/density, then sum (linear) or sign-elect and sum (ties);
* ``emr`` (EMR-Merging, Huang et al. 2024): elect a unified task vector, mask it to the target member's
  signs, rescale it to the target's mean magnitude.

Members, base and target (as the authors' ``MergedReference``): the members are ``[policy]``, plus the
reference when an ``anchor`` is given (the anchor then becomes the base and the reference the *target*
member EMR reconstructs), plus ``extra_policies``. With the single default member the elections are
trivial: ``ties`` reduces to trim-then-add, ``dare_ties`` to ``dare_linear``, ``emr`` to the policy's own
tau (lambda = 1), i.e. ``linear``. ``linear`` always uses only the policy (and the base); passing
``extra_policies`` to it is refused here (the authors' code ignores them silently).

Which tensors merge (authors' choice, followed): every floating-point tensor of the base, embeddings,
unembedding and norms included; non-float tensors are copied from the base. Task vectors are computed
in float32 and the merged tensor is cast to the base tensor's dtype; a stored merged tau (for an alpha
sweep) is kept in the base dtype, as the authors' code does. Defaults follow the authors' code and runner
(``runners/merged_bon.py``): density 0.2, seed 0, rescale on for the DARE methods only, TIES normalized
(disjoint mean), ``dare_*`` not normalized (sum over members).

Departures, on purpose: (1) sources whose tensor names or shapes differ are refused with an error naming
the tensor (the authors pad or truncate a mismatched vocabulary axis); (2) alpha is accepted in
[-ALPHA_BOUND, ALPHA_BOUND] = [-10, 10] (the authors' ``set_alpha`` accepts [0, 1]) so extrapolation can be
studied; (3) DARE's random mask of each tensor comes from its own key, derived from (seed, tensor name,
member index), so a merge does not depend on the order tensors are visited (the authors draw all masks
from one sequential generator); (4) EMR's rescale lambda is the authors' ratio of summed per-tensor
*means* by default (``emr_norm="tensor_mean"``); ``emr_norm="element_sum"`` gives the EMR paper's ratio of
sums over all elements.

Three ways to run a merge:

* in memory over parameter pytrees (NumPy or JAX arrays; a flat ``{name: array}`` dict or any pytree):
  :func:`merged_delta` (alpha-free, compute once) then ``.at(alpha)``, or :func:`merge` for one alpha;
  NumPy in gives NumPy out;
* on a mesh: JAX arrays keep their shardings; each tensor's merge is one jitted elementwise program
  (TIES' magnitude threshold is a sort of the tensor), run where the shards live;
* lazily over checkpoints on disk (HF safetensors directories): :func:`merge_checkpoints` reads each tensor
  of each source when it is needed and streams the merged tensor to the output file, so memory holds the
  sources' current tensors plus the output tensor (EMR reads everything twice: lambda is global).

LoRA: a policy given as :class:`LoraDelta` (target weight -> (A, B, scaling)) has tau = scaling * B @ A per
targeted weight and 0 elsewhere. ``linear`` then needs no dense tau at all: the merged reference is the
reference plus the same adapter with scaling multiplied by alpha (:meth:`LoraDelta.scaled`); other methods
materialize the dense tau of each targeted weight only.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import zlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pa_jax import io as pio
from pa_jax.models import params as P
from pa_jax.models.load import model_tensors as _mt
from pa_jax.models.load import open_safetensors_dir, write_safetensors_streaming

MERGE_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "emr")
ALPHA_BOUND = 10.0
DEFAULT_DENSITY = 0.2  # authors: MergedReference(density=0.2), runners/merged_bon.py --density 0.2
EMR_NORMS = ("tensor_mean", "element_sum")

# method -> (sparsify, sign consensus, normalize by the agreeing count, default rescale); authors' _SPEC
_GTA = {
    "ties": ("magnitude", True, True, False),
    "dare_linear": ("random", False, False, True),
    "dare_ties": ("random", True, False, True),
}


# ------------------------------------------------------------------------------------- validation
def check_alpha(alpha: Any, name: str = "alpha") -> float:
    """``alpha`` as a float; ValueError unless it is a finite number with |alpha| <= ALPHA_BOUND (10)."""
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={alpha!r}: expected a number") from None
    if isinstance(alpha, bool) or not math.isfinite(a) or abs(a) > ALPHA_BOUND:
        raise ValueError(f"{name}={alpha!r}: expected a finite number with |alpha| <= {ALPHA_BOUND:g}")
    return a


def check_density(density: Any) -> float:
    """``density`` (fraction of each task vector kept) as a float in (0, 1]; ValueError otherwise."""
    try:
        d = float(density)
    except (TypeError, ValueError):
        raise ValueError(f"density={density!r}: expected a number in (0, 1]") from None
    if not (0.0 < d <= 1.0):
        raise ValueError(f"density={density!r}: expected a number in (0, 1] (the fraction of tau kept)")
    return d


def check_method(method: Any) -> str:
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}; expected one of {', '.join(MERGE_METHODS)}")
    return method


def parse_merge_spec(spec: str) -> tuple[str, list[float]]:
    """``"METHOD:alpha1,alpha2,..."`` -> (method, [alphas]); ValueError naming the bad part."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"--reference-merge {spec!r}: expected METHOD:alpha1,alpha2,... (e.g. linear:0.25,0.5)")
    method, _, rest = spec.partition(":")
    method = check_method(method.strip())
    parts = [p.strip() for p in rest.split(",")]
    if not parts or any(p == "" for p in parts):
        raise ValueError(f"--reference-merge {spec!r}: empty alpha in the list {rest!r}")
    try:
        alphas = [check_alpha(p) for p in parts]
    except ValueError as e:
        raise ValueError(f"--reference-merge {spec!r}: {e}") from None
    if len(set(alphas)) != len(alphas):
        raise ValueError(f"--reference-merge {spec!r}: repeated alpha")
    return method, alphas


# ------------------------------------------------------------------------- per-tensor equations
def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.dtype(x.dtype), jnp.floating)


@jax.jit
def lerp(base, end, alpha):
    """(1 - alpha) * base + alpha * end, in float32, cast to base's dtype (linear merging, one tensor)."""
    a = jnp.asarray(alpha, jnp.float32)
    return ((1.0 - a) * base.astype(jnp.float32) + a * end.astype(jnp.float32)).astype(base.dtype)


@jax.jit
def add_scaled(base, tau, alpha):
    """base + alpha * tau, in float32, cast to base's dtype (theta_alpha = theta_base + alpha tau)."""
    a = jnp.asarray(alpha, jnp.float32)
    return (base.astype(jnp.float32) + a * tau.astype(jnp.float32)).astype(base.dtype)


@jax.jit
def task_vector(member, base):
    """tau = theta_member - theta_base in float32."""
    return member.astype(jnp.float32) - base.astype(jnp.float32)


def magnitude_keep_count(n: int, density: float) -> int:
    """k = max(1, floor(density * n)) entries kept by magnitude trimming (authors' count)."""
    return max(1, int(density * n))


def _on_host(x) -> bool:
    """NumPy arrays and JAX arrays living on CPU devices (host memory)."""
    return not isinstance(x, jax.Array) or all(d.platform == "cpu" for d in x.sharding.device_set)


@functools.partial(jax.jit, static_argnums=1)
def _kth_smallest_sorted(mag, index: int):
    return jnp.sort(mag.reshape(-1))[index]


@jax.jit
def _keep_at_least(tau, thr):
    return jnp.where(jnp.abs(tau) >= thr, tau, jnp.zeros_like(tau))


def magnitude_threshold(tau, density: float):
    """t_k, the k-th largest |tau| with k = max(1, floor(density n)); 0 when every entry is kept."""
    n = int(np.prod(tau.shape))
    k = magnitude_keep_count(n, check_density(density))
    if k >= n:
        return np.float32(0.0)
    if _on_host(tau):
        mag = np.abs(np.asarray(jax.device_get(tau), np.float32)).reshape(-1)
        thr = np.float32(np.partition(mag, n - k)[n - k])
        del mag
        return thr
    return _kth_smallest_sorted(jnp.abs(tau), n - k)


def magnitude_trim(tau, density: float):
    """TIES trim (Yadav et al. 2023, step 1): keep the k = max(1, floor(density n)) largest |tau| entries
    of the tensor, zero the rest. Entries tied with the k-th largest magnitude are all kept (threshold
    ``|tau| >= t_k``, as the authors' kthvalue threshold). t_k is found by selection (``np.partition``,
    O(n)) for arrays in host memory and by a sort on accelerators."""
    n = int(np.prod(tau.shape))
    if magnitude_keep_count(n, check_density(density)) >= n:
        return tau
    return _keep_at_least(_dev(tau), magnitude_threshold(tau, density))


def dare_key(seed: int, name: str, member: int = 0) -> jax.Array:
    """PRNG key of one tensor's DARE mask: fold_in(fold_in(key(seed), crc32(name)), member).

    Depends only on (seed, tensor name, member index), never on the order tensors are visited."""
    k = jax.random.fold_in(jax.random.key(int(seed)), np.uint32(zlib.crc32(name.encode("utf-8"))))
    return jax.random.fold_in(k, np.uint32(member))


@functools.partial(jax.jit, static_argnums=(2, 3))
def dare_drop(tau, key, density: float, rescale: bool = True):
    """DARE (Yu et al. 2024): keep each coordinate independently with probability ``density``
    (drop rate p = 1 - density), keep_j = [u_j < density], u ~ U[0, 1) from ``key``; then
    tau' = keep * tau / density when ``rescale`` (so E[tau'] = tau), keep * tau otherwise."""
    u = jax.random.uniform(key, tau.shape, jnp.float32)
    out = jnp.where(u < density, tau, jnp.zeros_like(tau))
    return out / density if rescale else out


def sign_consensus(deltas: Sequence, normalize: bool):
    """TIES elect + disjoint merge of task vectors ``deltas`` (a sequence of same-shape arrays):
    s = +1 where sum_i delta_i >= 0 else -1 (sign of the summed mass); agree_i = [sign(delta_i) == s]
    (zeros never agree); merged = sum_i agree_i delta_i, divided by max(1, sum_i agree_i) when
    ``normalize`` (TIES' disjoint mean; the DARE-TIES form sums). Elementwise over members (no stacked
    [M, ...] array), so under jit it fuses into one pass."""
    s = jnp.where(functools.reduce(jnp.add, deltas) >= 0, 1.0, -1.0).astype(deltas[0].dtype)
    mixed = jnp.zeros_like(deltas[0])
    count = jnp.zeros_like(deltas[0])
    for d in deltas:
        agree = jnp.sign(d) == s
        mixed = mixed + jnp.where(agree, d, 0)
        count = count + agree
    return mixed / jnp.maximum(count, 1) if normalize else mixed


def emr_elect_mask(taus: Sequence, target: int):
    """EMR (Huang et al. 2024) elect + mask over task vectors ``taus`` (same-shape arrays):
    s = +1 where sum_i tau_i > 0 else -1; tau_uni = s * max_i(|tau_i| * [tau_i s > 0]) (the largest
    magnitude among members agreeing with s); the target's effective vector M_t * tau_uni with
    M_t = [tau_target s > 0]. Returns M_t * tau_uni (before EMR's rescale lambda)."""
    s = jnp.where(functools.reduce(jnp.add, taus) > 0, 1.0, -1.0).astype(taus[0].dtype)
    uni = jnp.zeros_like(taus[0])
    for t in taus:
        uni = jnp.maximum(uni, jnp.where(t * s > 0, jnp.abs(t), 0))
    return jnp.where(taus[target] * s > 0, uni * s, 0)


@functools.partial(jax.jit, static_argnames=("sparsify", "consensus", "normalize", "density", "rescale"))
def gta_tau(base, members, thresholds, keys, *, sparsify, consensus, normalize, density, rescale):
    """One tensor's merged tau for ties / dare_linear / dare_ties (the authors' ``_gta_vector``), fused:
    tau_i = member_i - base (float32); sparsify ``"magnitude"``: tau_i [|tau_i| >= thresholds[i]]
    (see :func:`magnitude_trim`), ``"random"``: DARE's keep mask from ``keys[i]`` (see :func:`dare_drop`),
    None: untouched; divided by density when ``rescale``; then :func:`sign_consensus` (``consensus``)
    or the plain sum (divided by the member count when ``normalize``)."""
    deltas = []
    for i, m in enumerate(members):
        t = m.astype(jnp.float32) - base.astype(jnp.float32)
        if sparsify == "magnitude":
            t = jnp.where(jnp.abs(t) >= thresholds[i], t, 0)
        elif sparsify == "random":
            t = jnp.where(jax.random.uniform(keys[i], t.shape, jnp.float32) < density, t, 0)
        if sparsify is not None and rescale:
            t = t / density
        deltas.append(t)
    if consensus:
        return sign_consensus(deltas, normalize)
    total = functools.reduce(jnp.add, deltas)
    return total / len(deltas) if normalize else total


@functools.partial(jax.jit, static_argnames=("target",))
def emr_tensor(base, members, *, target):
    """One tensor's EMR pieces, fused: (M_t tau_uni, sum |tau_target|, sum |M_t tau_uni|) with
    tau_i = member_i - base in float32 (see :func:`emr_elect_mask`)."""
    taus = [m.astype(jnp.float32) - base.astype(jnp.float32) for m in members]
    eff = emr_elect_mask(taus, target)
    return eff, jnp.sum(jnp.abs(taus[target])), jnp.sum(jnp.abs(eff))


def emr_rescale_terms(sum_abs_target, sum_abs_effective, size: int, norm: str) -> tuple[float, float]:
    """One tensor's (numerator, denominator) of EMR's lambda = sum over tensors of num / sum of den:
    ``tensor_mean`` (authors): (mean |tau_target|, mean |M_t tau_uni|);
    ``element_sum`` (EMR paper): (sum |tau_target|, sum |M_t tau_uni|)."""
    n = float(size) if norm == "tensor_mean" else 1.0
    return float(sum_abs_target) / n, float(sum_abs_effective) / n


# -------------------------------------------------------------------------------------- pytrees
def _path_name(path) -> str:
    parts = []
    for p in path:
        for attr in ("key", "name", "idx"):
            if hasattr(p, attr):
                parts.append(str(getattr(p, attr)))
                break
        else:
            parts.append(str(p))
    if len(parts) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        parts.pop()  # an nnx Variable's array: named by its parameter path
    return ".".join(parts)


def flatten_named(tree) -> tuple[dict[str, Any], Any]:
    """(name -> leaf, treedef); a flat dict's names are its keys, nested names are joined with '.'."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    out: dict[str, Any] = {}
    for path, leaf in leaves:
        name = _path_name(path)
        if name in out:
            raise ValueError(f"two parameters share the name {name!r}")
        out[name] = leaf
    return out, treedef


def _fmt(names, limit: int = 8) -> str:
    names = sorted(names)
    s = ", ".join(names[:limit])
    return s + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def check_compatible(base: Mapping[str, Any], others: Mapping[str, Mapping[str, Any]]) -> None:
    """ValueError naming the first source and tensors whose names or shapes differ from the base's."""
    for label, other in others.items():
        missing = set(base) - set(other)
        extra = set(other) - set(base)
        if missing or extra:
            msg = []
            if missing:
                msg.append(f"missing tensors {_fmt(missing)}")
            if extra:
                msg.append(f"tensors not in the base {_fmt(extra)}")
            raise ValueError(f"{label} does not match the base's architecture: " + "; ".join(msg))
        bad = [
            f"{k} ({label} {tuple(other[k].shape)}, base {tuple(base[k].shape)})"
            for k in base
            if tuple(other[k].shape) != tuple(base[k].shape)
        ]
        if bad:
            raise ValueError(f"{label} has differently shaped tensors: {_fmt(bad)}")
        badf = [k for k in base if _is_float(base[k]) != _is_float(other[k])]
        if badf:
            raise ValueError(f"{label}: tensors float in one source and not the other: {_fmt(badf)}")


@dataclasses.dataclass(frozen=True)
class LoraDelta:
    """A LoRA policy relative to the reference: ``modules[name] = (A [r, in], B [out, r], scaling)`` with
    the weight ``W [out, in]`` at ``name + ".weight"`` (or at ``name`` itself when the base has that
    tensor); tau_W = scaling * B @ A (PEFT's delta, ``lora_B @ lora_A * lora_alpha / r``).

    Plugging in PEFT adapters: a loader returning PEFT's ``lora_A``/``lora_B`` per target module and its
    scaling (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA) builds this with
    ``LoraDelta({module: (A, B, scaling), ...})``, module names stripped of PEFT's ``base_model.model.``
    prefix."""

    modules: Mapping[str, tuple[Any, Any, float]]

    def scaled(self, alpha: float) -> "LoraDelta":
        """The same adapter with every scaling multiplied by alpha: reference + alpha * LoRA (linear merge)."""
        alpha = check_alpha(alpha)
        return LoraDelta({m: (a, b, float(s) * alpha) for m, (a, b, s) in self.modules.items()})

    def weight_names(self, base_names) -> dict[str, str]:
        """module -> the base tensor it modifies; ValueError naming a module with no such tensor or
        with inconsistent A/B shapes."""
        out = {}
        for m, ab in self.modules.items():
            if not (isinstance(ab, (tuple, list)) and len(ab) == 3):
                raise ValueError(f"LoRA module {m!r}: expected (A, B, scaling), got {type(ab).__name__}")
            w = m + ".weight" if m + ".weight" in base_names else m
            if w not in base_names:
                raise ValueError(f"LoRA module {m!r}: the reference has no tensor {m + '.weight'!r}")
            out[m] = w
        return out

    def dense(self, module: str):
        """tau = scaling * B @ A of one module, float32."""
        a, b, s = self.modules[module]
        a = jnp.asarray(a, jnp.float32)
        b = jnp.asarray(b, jnp.float32)
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(
                f"LoRA module {module!r}: A {tuple(a.shape)} and B {tuple(b.shape)} are not [r, in] and [out, r]"
            )
        return jnp.float32(s) * (b @ a)


def apply_lora(reference, lora: LoraDelta):
    """reference + LoRA: W + scaling * B @ A at each targeted weight (float32, cast to W's dtype); other
    tensors are the reference's own arrays. NumPy in gives NumPy out."""
    flat, treedef = flatten_named(reference)
    numpy_in = _all_numpy(flat.values())
    names = lora.weight_names(flat)
    out = dict(flat)
    for m, w in names.items():
        tau = lora.dense(m)
        if tuple(tau.shape) != tuple(flat[w].shape):
            raise ValueError(f"LoRA module {m!r}: delta shape {tuple(tau.shape)} != tensor {w!r} {tuple(flat[w].shape)}")
        out[w] = _out(add_scaled(_dev(flat[w]), tau, 1.0), numpy_in)
    return jax.tree_util.tree_unflatten(treedef, [out[n] for n in flat])


def _all_numpy(leaves) -> bool:
    return all(not isinstance(x, jax.Array) for x in leaves)


def _dev(x):
    return x if isinstance(x, jax.Array) else jnp.asarray(x)


def _out(x, numpy_in: bool):
    return np.asarray(jax.device_get(x)) if numpy_in else x


@dataclasses.dataclass(frozen=True)
class MergeOptions:
    """A merge method and its knobs (defaults: the authors' ``MergedReference`` / ``merged_bon.py``).

    density: fraction of each tau kept by TIES' trim and DARE's drop (DARE's drop rate p = 1 - density);
    seed: DARE's seed; rescale: divide DARE's survivors by density (default: on for dare_*, off for ties);
    emr_norm: "tensor_mean" (authors) or "element_sum" (EMR paper), see :func:`emr_rescale_terms`."""

    method: str = "linear"
    density: float = DEFAULT_DENSITY
    seed: int = 0
    rescale: bool | None = None
    emr_norm: str = "tensor_mean"

    def __post_init__(self):
        check_method(self.method)
        object.__setattr__(self, "density", check_density(self.density))
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r}: expected a non-negative integer")
        if self.emr_norm not in EMR_NORMS:
            raise ValueError(f"emr_norm={self.emr_norm!r}: expected one of {', '.join(EMR_NORMS)}")
        if self.rescale is not None and not isinstance(self.rescale, bool):
            raise ValueError(f"rescale={self.rescale!r}: expected True, False or None")

    @classmethod
    def of(cls, method: str, options: Mapping[str, Any], where: str = "merge") -> "MergeOptions":
        """The options of ``method`` from keyword knobs (the fields after ``method``; missing ones take their
        defaults); an unknown knob is a TypeError naming it and the known ones."""
        knobs = tuple(f.name for f in dataclasses.fields(cls) if f.name != "method")
        unknown = sorted(set(options) - set(knobs))
        if unknown:
            raise TypeError(f"{where}: unknown option(s) {', '.join(unknown)} (the options are {', '.join(knobs)})")
        return cls(method, **options)

    @property
    def effective_rescale(self) -> bool:
        if self.rescale is not None:
            return self.rescale
        return _GTA.get(self.method, (None, None, None, False))[3]

    def as_dict(self) -> dict:
        d = {"method": self.method}
        if self.method in ("ties", "dare_linear", "dare_ties"):
            d["density"] = self.density
        if self.method.startswith("dare"):
            d["seed"] = int(self.seed)
        if self.method in _GTA:
            d["rescale"] = self.effective_rescale
        if self.method == "emr":
            d["emr_norm"] = self.emr_norm
        return d


def _gta_args(name: str, base, members: Sequence, opts: MergeOptions) -> tuple:
    """(thresholds, keys, static knobs) of :func:`gta_tau` for one tensor of ties / dare_linear / dare_ties:
    TIES thresholds by selection on the host (:func:`magnitude_trim`'s), DARE keys from (seed, name, member);
    no sparsification at density 1."""
    sparsify, consensus, normalize, _ = _GTA[opts.method]
    if opts.density >= 1.0:
        sparsify = None
    thresholds = keys = None
    if sparsify == "magnitude":
        thresholds = tuple(magnitude_threshold(task_vector(m, base), opts.density) for m in members)
    elif sparsify == "random":
        keys = tuple(dare_key(opts.seed, name, i) for i in range(len(members)))
    return thresholds, keys, dict(sparsify=sparsify, consensus=consensus, normalize=normalize, density=opts.density,
                                  rescale=opts.effective_rescale)


def _gta_tensor(name: str, base, members: Sequence, opts: MergeOptions):
    """Merged tau (float32) of one float tensor for ties / dare_linear / dare_ties (:func:`gta_tau`)."""
    base = _dev(base)
    members = tuple(_dev(m) for m in members)
    thresholds, keys, static = _gta_args(name, base, members, opts)
    return gta_tau(base, members, thresholds, keys, **static)


@dataclasses.dataclass
class MergedDelta:
    """An alpha-free merge: ``.at(alpha)`` is the merged reference pytree theta_base + alpha * tau
    (``linear``: (1 - alpha) theta_base + alpha theta_policy). ``info`` records method, knobs and (EMR)
    lambda. ``lora`` is set for a LoRA linear merge: ``lora.scaled(alpha)`` is the merged adapter."""

    options: MergeOptions
    base: dict[str, Any]
    treedef: Any
    endpoint: dict[str, Any] | None
    tau: dict[str, Any] | None
    numpy_in: bool
    info: dict
    lora: LoraDelta | None = None

    def at(self, alpha: float):
        a = check_alpha(alpha)
        out = {}
        for name, b in self.base.items():
            if not _is_float(b):
                out[name] = b
            elif self.endpoint is not None:
                out[name] = _out(lerp(_dev(b), _dev(self.endpoint[name]), a), self.numpy_in)
            elif self.tau.get(name) is None:
                out[name] = b
            else:
                out[name] = _out(add_scaled(_dev(b), self.tau[name], a), self.numpy_in)
        return jax.tree_util.tree_unflatten(self.treedef, [out[n] for n in self.base])


def _extra_policies(method: str, extra_policies) -> list:
    """``extra_policies`` as a list; refused for ``linear`` (it merges the policy only)."""
    extra_policies = list(extra_policies or ())
    if method == "linear" and extra_policies:
        raise ValueError("extra_policies: linear merging uses only the policy; pass them to ties, dare_ties or emr")
    return extra_policies


def _collect_members(reference, policy, extra_policies, anchor, method):
    """(base flat, treedef, member flats or LoraDeltas, target index, is_lora), the authors' layout:
    members = [policy] (+ [reference] when an anchor is the base; the target is then the reference)
    + extra_policies."""
    ref_flat, treedef = flatten_named(reference)
    extra_policies = _extra_policies(method, extra_policies)
    labelled = [("policy", policy)] + [(f"extra_policies[{i}]", e) for i, e in enumerate(extra_policies)]
    lora = [lbl for lbl, m in labelled if isinstance(m, LoraDelta)]
    if lora:
        dense = [lbl for lbl, m in labelled if not isinstance(m, LoraDelta)]
        if dense:
            raise ValueError(f"cannot mix LoRA and dense policies: {', '.join(lora)} LoRA, {', '.join(dense)} dense")
        if anchor is not None:
            raise ValueError("anchor: not supported with a LoRA policy (its delta is relative to the reference)")
        for lbl, m in labelled:
            m.weight_names(ref_flat)
        return ref_flat, treedef, [m for _, m in labelled], 0, True
    if anchor is None:
        base, target = ref_flat, 0
    else:
        base, anchor_def = flatten_named(anchor)
        if anchor_def != treedef:
            raise ValueError("anchor: its pytree structure differs from the reference's")
        labelled.insert(1, ("reference", reference))
        target = 1
    flats = {lbl: (ref_flat if m is reference else flatten_named(m)[0]) for lbl, m in labelled}
    check_compatible(base, flats)
    return base, treedef, [flats[lbl] for lbl, _ in labelled], target, False


def merged_delta(reference, policy, method: str = "linear", *, extra_policies: Sequence = (), anchor=None,
                 **options) -> MergedDelta:
    """Compute a merge once for many alphas: tau (or, for linear, the policy endpoint) per tensor.

    reference, policy, extra_policies, anchor: parameter pytrees of one architecture (same names and
    shapes), NumPy or JAX arrays; policy (and every extra policy) may instead be a :class:`LoraDelta`.
    options: the knobs of :class:`MergeOptions` (``density``, ``seed``, ``rescale``, ``emr_norm``; defaults
    there). See the module docstring for members/base/target."""
    opts = MergeOptions.of(method, options, "merged_delta")
    base, treedef, members, target, is_lora = _collect_members(reference, policy, extra_policies, anchor, method)
    numpy_in = _all_numpy(base.values())
    info = {**opts.as_dict(), "members": len(members), "anchor": anchor is not None, "lora": is_lora}
    if not is_lora:
        if method == "linear":
            return MergedDelta(opts, base, treedef, members[0], None, numpy_in, info)
        return MergedDelta(opts, base, treedef, None, _merge_taus(base, members, target, opts, info), numpy_in, info)
    names = [lm.weight_names(base) for lm in members]
    if method == "linear":
        # tau = scaling * B @ A on targeted weights only; the adapter form (lora.scaled(alpha)) needs none of it
        tau = {w: members[0].dense(m) for m, w in names[0].items()}
        for m, w in names[0].items():
            if tuple(tau[w].shape) != tuple(base[w].shape):
                raise ValueError(f"LoRA module {m!r}: delta shape {tuple(tau[w].shape)} != tensor {w!r} {tuple(base[w].shape)}")
        return MergedDelta(opts, base, treedef, None, tau, numpy_in, info, lora=members[0])
    # other methods: dense member tensors on targeted weights only (base + its LoRA delta, or base)
    targeted = sorted({w for n in names for w in n.values()})
    flats = []
    for lm, n in zip(members, names):
        by_weight = {w: m for m, w in n.items()}
        flats.append({
            w: add_scaled(_dev(base[w]), lm.dense(by_weight[w]), 1.0) if w in by_weight else base[w]
            for w in targeted
        })
    tau = _merge_taus({w: base[w] for w in targeted}, flats, target, opts, info)
    return MergedDelta(opts, base, treedef, None, tau, numpy_in, info)


def _merge_taus(base: Mapping[str, Any], members: Sequence[Mapping[str, Any]], target: int, opts: MergeOptions, info: dict):
    """name -> merged tau (in the base tensor's dtype) for ties / dare_* / emr; None for non-float tensors."""
    tau: dict[str, Any] = {}
    if opts.method == "emr":
        num = den = 0.0
        for name, b in base.items():
            if not _is_float(b):
                tau[name] = None
                continue
            eff, st, se = emr_tensor(_dev(b), tuple(_dev(m[name]) for m in members), target=target)
            n_, d_ = emr_rescale_terms(st, se, int(np.prod(b.shape)), opts.emr_norm)
            num, den = num + n_, den + d_
            tau[name] = eff
        lam = num / den if den > 0 else 1.0
        info["emr_lambda"] = lam
        return {k: None if v is None else (v * jnp.float32(lam)).astype(base[k].dtype) for k, v in tau.items()}
    for name, b in base.items():
        if not _is_float(b):
            tau[name] = None
            continue
        tau[name] = _gta_tensor(name, b, [m[name] for m in members], opts).astype(jnp.dtype(b.dtype))
    return tau


def merge(reference, policy, alpha: float, method: str = "linear", **options):
    """The merged reference theta_alpha = theta_base + alpha * tau for one alpha (see :func:`merged_delta`)."""
    a = check_alpha(alpha)
    return merged_delta(reference, policy, method, **options).at(a)


def merge_linear(reference, policy, alpha: float, *, anchor=None):
    """Task arithmetic (Ilharco et al. 2023): theta_alpha = (1 - alpha) theta_base + alpha theta_policy
    = theta_base + alpha (theta_policy - theta_base); base = anchor if given, else the reference."""
    return merge(reference, policy, alpha, "linear", anchor=anchor)


def merge_ties(reference, policy, alpha: float, *, extra_policies=(), anchor=None, density=DEFAULT_DENSITY):
    """TIES-Merging (Yadav et al. 2023): tau_i' = trim_density(tau_i); s = sign(sum_i tau_i') (0 -> +);
    tau = sum_i [sign tau_i' = s] tau_i' / max(1, sum_i [sign tau_i' = s]); theta_base + alpha tau."""
    return merge(reference, policy, alpha, "ties", extra_policies=extra_policies, anchor=anchor, density=density)


def merge_dare_linear(reference, policy, alpha: float, *, extra_policies=(), anchor=None, density=DEFAULT_DENSITY, seed=0, rescale=True):
    """DARE (Yu et al. 2024) + linear: tau_i' = m_i * tau_i / density, m_i ~ Bernoulli(density) iid per
    coordinate (keyed by seed, tensor name, member); tau = sum_i tau_i'; theta_base + alpha tau."""
    return merge(reference, policy, alpha, "dare_linear", extra_policies=extra_policies, anchor=anchor,
                 density=density, seed=seed, rescale=rescale)


def merge_dare_ties(reference, policy, alpha: float, *, extra_policies=(), anchor=None, density=DEFAULT_DENSITY, seed=0, rescale=True):
    """DARE-TIES: DARE's tau_i' then TIES' sign election, summed (not averaged) over agreeing members:
    tau = sum_i [sign tau_i' = s] tau_i', s = sign(sum_i tau_i') (0 -> +); theta_base + alpha tau."""
    return merge(reference, policy, alpha, "dare_ties", extra_policies=extra_policies, anchor=anchor,
                 density=density, seed=seed, rescale=rescale)


def merge_emr(reference, policy, alpha: float, *, extra_policies=(), anchor=None, emr_norm="tensor_mean"):
    """EMR-Merging (Huang et al. 2024) for the target member t (the policy; the reference with an anchor):
    s = sign(sum_i tau_i) (0 -> -), tau_uni = s * max_i |tau_i| over members agreeing with s,
    M_t = [tau_t s > 0], lambda = (sum |tau_t|) / (sum |M_t tau_uni|) (per-tensor means summed by default,
    see :func:`emr_rescale_terms`); tau = lambda M_t tau_uni; theta_base + alpha tau."""
    return merge(reference, policy, alpha, "emr", extra_policies=extra_policies, anchor=anchor, emr_norm=emr_norm)


# ------------------------------------------------------------------------------- decoder models
def model_tensors(config, model) -> dict[str, Any]:
    """HF key -> parameter array of a :class:`pa_jax.models.Decoder` (the arrays themselves, shardings kept);
    the names the disk merge and DARE's keys use."""

    return _mt(config, model)


def replace_params(config, model, tensors: Mapping[str, Any]):
    """A new Decoder with ``model``'s structure whose parameters are ``tensors`` (HF key -> array, e.g.
    ``merged_delta(model_tensors(c, ref), model_tensors(c, pol), ...).at(alpha)``); arrays are used as
    given (a mesh's shardings stay), ``model`` is not modified. ValueError naming a missing or misshapen
    tensor."""
    from flax import nnx


    graphdef, state = nnx.split(model)
    new = []
    for path, var in nnx.to_flat_state(state):
        key = P.path_to_hf_key(config, P.path_str(path))
        if key not in tensors:
            raise ValueError(f"replace_params: no tensor {key!r}")
        value = tensors[key]
        if tuple(value.shape) != tuple(var.get_value().shape):
            raise ValueError(f"replace_params: tensor {key!r} has shape {tuple(value.shape)}, the model "
                             f"{tuple(var.get_value().shape)}")
        new.append((path, var.replace(_dev(value))))
    return nnx.merge(graphdef, nnx.from_flat_state(new))


# ------------------------------------------------------------------------- lazily, from disk
# Config fields that must agree between sources of one architecture (when present in either).
_ARCH_FIELDS = (
    "model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings",
)


def _read_config(path: pathlib.Path) -> dict:
    f = path / "config.json"
    if not f.is_file():
        raise ValueError(f"{path}: no config.json (expected a Hugging Face checkpoint directory)")
    return json.loads(f.read_text())


def _check_configs(base_label: str, base_cfg: dict, others: Mapping[str, dict]) -> None:
    for label, cfg in others.items():
        for k in _ARCH_FIELDS:
            if (k in base_cfg or k in cfg) and base_cfg.get(k) != cfg.get(k):
                raise ValueError(
                    f"{label} is a different architecture than {base_label}: config field {k!r} is "
                    f"{cfg.get(k)!r} there and {base_cfg.get(k)!r} in {base_label}"
                )


def _open(path, label):

    p = pathlib.Path(path)
    if not p.is_dir():
        raise ValueError(f"{label} {p}: not a directory (expected a Hugging Face safetensors checkpoint)")
    return p, open_safetensors_dir(p)


_COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                 "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")


def _read_device(t):
    """A lazy checkpoint tensor read whole (a private host copy; on CPU the device array may alias it)."""
    return jnp.asarray(t.read())


@functools.partial(jax.jit, static_argnames=("sparsify", "consensus", "normalize", "density", "rescale"))
def _gta_apply(base, members, thresholds, keys, alpha, *, sparsify, consensus, normalize, density, rescale):
    """base + alpha * gta_tau(...) (tau cast to base's dtype first, as the in-memory path stores it), fused."""
    tau = gta_tau(base, members, thresholds, keys, sparsify=sparsify, consensus=consensus, normalize=normalize,
                  density=density, rescale=rescale).astype(base.dtype)
    return add_scaled(base, tau, alpha)


@functools.partial(jax.jit, static_argnames=("target",))
def _emr_apply(base, members, lam, alpha, *, target):
    """base + alpha * (lambda * M_t tau_uni) (cast to base's dtype first, as the in-memory path), fused."""
    eff, _, _ = emr_tensor(base, members, target=target)
    return add_scaled(base, (eff * lam).astype(base.dtype), alpha)


def merge_checkpoints(reference, policy, out, alpha: float, method: str = "linear", *,
                      extra_policies: Sequence = (), anchor=None, **options) -> dict:
    """Merge checkpoint directories on disk, tensor by tensor, into ``out`` (config.json, tokenizer files of
    the base, one ``model.safetensors``); returns the merge info (also in the file's ``__metadata__``).
    options: the knobs of :class:`MergeOptions`, as for :func:`merged_delta`.

    Each source tensor is memory-mapped and read only while its output tensor is computed; the output is
    streamed into one file written atomically (``pa_jax.io.atomic_write_bytes``). Peak memory is therefore
    about the sources' current tensors (float32 copies) plus the output tensor, not a model. EMR reads the
    sources twice (its lambda sums over all tensors). Same equations as :func:`merged_delta` (the same
    per-tensor functions); directories must share config architecture fields, tensor names and shapes."""

    a = check_alpha(alpha)
    opts = MergeOptions.of(method, options, "merge_checkpoints")
    extra_policies = _extra_policies(method, extra_policies)
    ref_p, ref_t = _open(reference, "reference")
    pol_p, pol_t = _open(policy, "policy")
    sources = {"reference": (ref_p, ref_t), "policy": (pol_p, pol_t)}
    for i, e in enumerate(extra_policies):
        sources[f"extra_policies[{i}]"] = _open(e, f"extra_policies[{i}]")
    if anchor is not None:
        base_label = "anchor"
        base_p, base_t = _open(anchor, "anchor")
        member_labels = ["policy", "reference"] + [f"extra_policies[{i}]" for i in range(len(extra_policies))]
        target = 1
    else:
        base_label, base_p, base_t = "reference", ref_p, ref_t
        member_labels = ["policy"] + [f"extra_policies[{i}]" for i in range(len(extra_policies))]
        target = 0
    others = {k: v for k, v in sources.items() if k != base_label}
    _check_configs(f"{base_label} {base_p}", _read_config(base_p), {f"{k} {v[0]}": _read_config(v[0]) for k, v in others.items()})
    check_compatible(base_t, {f"{k} {v[0]}": v[1] for k, v in others.items()})
    out_p = pathlib.Path(out)
    if out_p.resolve() in {p.resolve() for p, _ in sources.values()} | {base_p.resolve()}:
        raise ValueError(f"out {out_p}: must differ from every source directory")
    members = [sources[lbl][1] for lbl in member_labels]
    names = sorted(base_t)
    info = {**opts.as_dict(), "alpha": a, "members": len(members), "anchor": anchor is not None}

    lam = 1.0
    if method == "emr":  # pass 1: lambda
        num = den = 0.0
        for name in names:
            b = base_t[name]
            if not _is_float(b):
                continue
            _, st, se = emr_tensor(_read_device(b), tuple(_read_device(m[name]) for m in members), target=target)
            n_, d_ = emr_rescale_terms(st, se, int(np.prod(b.shape)), opts.emr_norm)
            num, den = num + n_, den + d_
        lam = num / den if den > 0 else 1.0
        info["emr_lambda"] = lam

    def merged_tensor(name: str) -> np.ndarray:
        b = base_t[name]
        if not _is_float(b):
            return b.read()
        bj = _read_device(b)
        ms = tuple(_read_device(m[name]) for m in members)
        if method == "linear":
            r = lerp(bj, ms[0], a)
        elif method == "emr":
            r = _emr_apply(bj, ms, jnp.float32(lam), jnp.float32(a), target=target)
        else:
            thresholds, keys, static = _gta_args(name, bj, ms, opts)
            r = _gta_apply(bj, ms, thresholds, keys, jnp.float32(a), **static)
        del bj, ms
        return np.asarray(jax.device_get(r))

    meta = {"format": "pt", "pa_jax_merge": json.dumps(info, sort_keys=True)}
    out_p.mkdir(parents=True, exist_ok=True)
    write_safetensors_streaming(
        out_p / "model.safetensors", {n: (base_t[n].shape, base_t[n].dtype) for n in names}, merged_tensor, meta
    )
    cfg = _read_config(base_p)
    pio.atomic_write_json(out_p / "config.json", cfg)
    for fname in _COPIED_FILES:
        src = base_p / fname
        if src.is_file():
            pio.atomic_write_bytes(out_p / fname, src.read_bytes())
    return info


__all__ = [
    "ALPHA_BOUND",
    "DEFAULT_DENSITY",
    "EMR_NORMS",
    "MERGE_METHODS",
    "LoraDelta",
    "MergeOptions",
    "MergedDelta",
    "add_scaled",
    "apply_lora",
    "check_alpha",
    "check_compatible",
    "dare_drop",
    "dare_key",
    "emr_elect_mask",
    "emr_rescale_terms",
    "emr_tensor",
    "flatten_named",
    "gta_tau",
    "lerp",
    "magnitude_threshold",
    "magnitude_trim",
    "merge",
    "merge_checkpoints",
    "merge_dare_linear",
    "merge_dare_ties",
    "merge_emr",
    "merge_linear",
    "merge_ties",
    "merged_delta",
    "model_tensors",
    "replace_params",
    "parse_merge_spec",
    "sign_consensus",
    "task_vector",
    "write_safetensors_streaming",
]
