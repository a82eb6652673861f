"""Declarative, bidirectional tensor-name mapping between PyTorch state dicts and flat JAX state paths.

A :class:`Mapping` is a list of :class:`Rule` s. Each rule pairs one or more torch name patterns with one or more
JAX path patterns (dotted nnx state paths such as ``model.layers.{i}.self_attn.q_proj.kernel``) and a
:class:`Transform` that is exact in both directions (pure data movement: transpose, reshape, split, concatenate,
half swap), so torch -> JAX -> torch is bit-exact. ``{name}`` wildcards expand over ``range(counts[name])``.

All transforms work on numpy arrays and never change the dtype.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Callable, Iterator, Sequence
from collections.abc import Mapping as AnyMapping

import numpy as np

from conversion.errors import ConversionError, MissingTensorsError, ShapeMismatchError, UnexpectedTensorsError

Shape = tuple[int, ...]
_WILDCARD = re.compile(r"\{(\w+)\}")


# ----------------------------------------------------------------------------------------------------------- transforms
_BLOCK = 256
UINT_BY_ITEMSIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}  # bit-exact views of any dtype


def transpose(x: np.ndarray, perm: Sequence[int]) -> np.ndarray:
    """``np.transpose(x, perm)`` as a new C-contiguous array. 2-D transposes of large arrays go tile by tile on an
    unsigned-integer view of the bits (2-3x faster than numpy's strided copy, and exact for any dtype)."""
    perm = tuple(perm)
    if x.ndim != 2 or perm != (1, 0) or x.size < _BLOCK * _BLOCK:
        return np.ascontiguousarray(np.transpose(x, perm))
    bits = UINT_BY_ITEMSIZE.get(x.dtype.itemsize)
    src = x.view(bits) if bits is not None and x.flags.c_contiguous else x
    out = np.empty((x.shape[1], x.shape[0]), src.dtype)
    for i in range(0, x.shape[0], _BLOCK):
        for j in range(0, x.shape[1], _BLOCK):
            out[j : j + _BLOCK, i : i + _BLOCK] = src[i : i + _BLOCK, j : j + _BLOCK].T
    return out.view(x.dtype) if src.dtype != x.dtype else out


class Transform:
    """Maps a list of torch tensors to a list of JAX tensors and back; shapes can be mapped without data."""

    n_torch: int = 1
    n_jax: int = 1

    def to_jax(self, xs: Sequence[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def to_torch(self, xs: Sequence[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def jax_shapes(self, shapes: Sequence[Shape]) -> list[Shape]:
        raise NotImplementedError

    def torch_shapes(self, shapes: Sequence[Shape]) -> list[Shape]:
        raise NotImplementedError


class Elementwise(Transform):
    """A one-tensor transform applied to every tensor of the list (so it composes after a split)."""

    n_torch = n_jax = -1  # any arity, same on both sides

    def fwd(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def bwd(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def fwd_shape(self, s: Shape) -> Shape:
        raise NotImplementedError

    def bwd_shape(self, s: Shape) -> Shape:
        raise NotImplementedError

    def to_jax(self, xs):
        return [self.fwd(x) for x in xs]

    def to_torch(self, xs):
        return [self.bwd(x) for x in xs]

    def jax_shapes(self, shapes):
        return [tuple(self.fwd_shape(tuple(s))) for s in shapes]

    def torch_shapes(self, shapes):
        return [tuple(self.bwd_shape(tuple(s))) for s in shapes]


@dataclasses.dataclass(frozen=True)
class Identity(Elementwise):
    def fwd(self, x):
        return x

    bwd = fwd

    def fwd_shape(self, s):
        return s

    bwd_shape = fwd_shape


@dataclasses.dataclass(frozen=True)
class Permute(Elementwise):
    """``jax = torch.transpose(perm)``. ``Permute((1, 0))`` turns a torch Linear weight [out, in] into [in, out];
    ``Permute((2, 3, 1, 0))`` a Conv2d weight [O, I, kh, kw] into flax's [kh, kw, I, O]."""

    perm: tuple[int, ...] = (1, 0)

    @property
    def inverse(self) -> tuple[int, ...]:
        return tuple(int(i) for i in np.argsort(self.perm))

    def fwd(self, x):
        self._check(x.shape)
        return transpose(x, self.perm)

    def bwd(self, x):
        self._check(x.shape)
        return transpose(x, self.inverse)

    def fwd_shape(self, s):
        self._check(s)
        return tuple(s[p] for p in self.perm)

    def bwd_shape(self, s):
        self._check(s)
        return tuple(s[p] for p in self.inverse)

    def _check(self, s: Shape) -> None:
        if len(s) != len(self.perm):
            raise ConversionError(f"permutation {self.perm} applied to a tensor of rank {len(s)} (shape {tuple(s)})")


@dataclasses.dataclass(frozen=True)
class ConvToMatmul(Elementwise):
    """A stride = kernel conv (patch embedding) as a matmul: torch [O, *kernel] <-> JAX [prod(kernel), O].

    ``kernel`` is the torch weight shape without the output dim, e.g. (3, 2, 14, 14) for Qwen2.5-VL's Conv3d.
    """

    kernel: tuple[int, ...]

    def fwd(self, x):
        return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)

    def bwd(self, x):
        return np.ascontiguousarray(x.T).reshape(x.shape[1], *self.kernel)

    def fwd_shape(self, s):
        return (int(np.prod(s[1:])), s[0])

    def bwd_shape(self, s):
        return (s[1], *self.kernel)


@dataclasses.dataclass(frozen=True)
class Reshape(Elementwise):
    """torch ``torch_shape`` <-> JAX ``jax_shape`` (same element order), e.g. a fused qkv bias [3C] <-> [3, C]."""

    torch_shape: tuple[int, ...]
    jax_shape: tuple[int, ...]

    def fwd(self, x):
        return x.reshape(self.jax_shape)

    def bwd(self, x):
        return x.reshape(self.torch_shape)

    def fwd_shape(self, s):
        self._check(s, self.torch_shape)
        return self.jax_shape

    def bwd_shape(self, s):
        self._check(s, self.jax_shape)
        return self.torch_shape

    @staticmethod
    def _check(s: Shape, want: Shape) -> None:
        if int(np.prod(s)) != int(np.prod(want)):
            raise ConversionError(f"cannot reshape a tensor of shape {tuple(s)} to {tuple(want)}")


@dataclasses.dataclass(frozen=True)
class HalfSwap(Elementwise):
    """Swap the two halves along ``axis`` (FLUX ``final_norm_out``: DiffSynth (scale, shift) <-> BFL (shift, scale)).

    Its own inverse. Use before a :class:`Permute` (it acts on the torch axis 0 of weight and bias)."""

    axis: int = 0

    def fwd(self, x):
        n = x.shape[self.axis]
        if n % 2:
            raise ConversionError(f"half swap along axis {self.axis} of odd length {n} (shape {x.shape})")
        a, b = np.split(x, 2, axis=self.axis)
        return np.concatenate([b, a], axis=self.axis)

    bwd = fwd

    def fwd_shape(self, s):
        return s

    bwd_shape = fwd_shape


@dataclasses.dataclass(frozen=True)
class Concat(Transform):
    """Several torch tensors -> one JAX tensor along ``axis`` (e.g. diffusers to_q/to_k/to_v -> a fused qkv).

    ``sizes`` are the parts' extents along ``axis``, needed to split on the way back."""

    axis: int
    sizes: tuple[int, ...]

    @property
    def n_torch(self) -> int:  # type: ignore[override]
        return len(self.sizes)

    n_jax = 1

    def to_jax(self, xs):
        return [np.concatenate(list(xs), axis=self.axis)]

    def to_torch(self, xs):
        (x,) = xs
        return [np.ascontiguousarray(p) for p in np.split(x, np.cumsum(self.sizes)[:-1], axis=self.axis)]

    def jax_shapes(self, shapes):
        s = list(shapes[0])
        s[self.axis] = sum(t[self.axis] for t in shapes)
        return [tuple(s)]

    def torch_shapes(self, shapes):
        (s,) = shapes
        return [tuple(n if d == self.axis % len(s) else s[d] for d in range(len(s))) for n in self.sizes]


@dataclasses.dataclass(frozen=True)
class Split(Transform):
    """One torch tensor -> several JAX tensors along ``axis`` (e.g. a fused torch qkv -> separate q, k, v)."""

    axis: int
    sizes: tuple[int, ...]
    n_torch = 1

    @property
    def n_jax(self) -> int:  # type: ignore[override]
        return len(self.sizes)

    def to_jax(self, xs):
        return Concat(self.axis, self.sizes).to_torch(xs)

    def to_torch(self, xs):
        return Concat(self.axis, self.sizes).to_jax(xs)

    def jax_shapes(self, shapes):
        return Concat(self.axis, self.sizes).torch_shapes(shapes)

    def torch_shapes(self, shapes):
        return Concat(self.axis, self.sizes).jax_shapes(shapes)


@dataclasses.dataclass(frozen=True)
class Chain(Transform):
    """Apply transforms in order on the way to JAX, in reverse order on the way back."""

    parts: tuple[Transform, ...]

    @property
    def n_torch(self) -> int:  # type: ignore[override]
        return next((t.n_torch for t in self.parts if t.n_torch != -1), -1)

    @property
    def n_jax(self) -> int:  # type: ignore[override]
        return next((t.n_jax for t in reversed(self.parts) if t.n_jax != -1), -1)

    def to_jax(self, xs):
        for t in self.parts:
            xs = t.to_jax(xs)
        return list(xs)

    def to_torch(self, xs):
        for t in reversed(self.parts):
            xs = t.to_torch(xs)
        return list(xs)

    def jax_shapes(self, shapes):
        for t in self.parts:
            shapes = t.jax_shapes(shapes)
        return list(shapes)

    def torch_shapes(self, shapes):
        for t in reversed(self.parts):
            shapes = t.torch_shapes(shapes)
        return list(shapes)


IDENTITY = Identity()
LINEAR = Permute((1, 0))  # torch Linear weight [out, in] <-> JAX kernel [in, out]
CONV2D = Permute((2, 3, 1, 0))  # torch Conv2d [O, I, kh, kw] <-> flax Conv [kh, kw, I, O]


# ---------------------------------------------------------------------------------------------------------------- rules
@dataclasses.dataclass(frozen=True)
class Rule:
    """torch name pattern(s) <-> JAX path pattern(s), with the transform from torch to JAX."""

    torch: tuple[str, ...]
    jax: tuple[str, ...]
    transform: Transform = IDENTITY

    def __post_init__(self) -> None:
        t, j = self.transform.n_torch, self.transform.n_jax
        if t == -1 and len(self.torch) != len(self.jax):
            raise ValueError(f"elementwise rule needs as many torch as JAX names: {self.torch} vs {self.jax}")
        if t != -1 and len(self.torch) != t or j != -1 and len(self.jax) != j:
            raise ValueError(f"transform {self.transform} takes {t} torch and gives {j} JAX tensors: {self}")
        if set(_wildcards(self.torch)) != set(_wildcards(self.jax)):
            raise ValueError(f"torch and JAX patterns use different wildcards: {self.torch} vs {self.jax}")


def rule(torch: str | Sequence[str], jax: str | Sequence[str], transform: Transform = IDENTITY) -> Rule:
    """A :class:`Rule` from single names or sequences of names."""
    as_tuple = lambda x: (x,) if isinstance(x, str) else tuple(x)
    return Rule(as_tuple(torch), as_tuple(jax), transform)


def linear(torch_prefix: str, jax_prefix: str, bias: bool = True, weight: Transform = LINEAR) -> list[Rule]:
    """torch ``{p}.weight`` [out, in] / ``{p}.bias`` <-> JAX ``{q}.kernel`` [in, out] / ``{q}.bias``."""
    rules = [rule(f"{torch_prefix}.weight", f"{jax_prefix}.kernel", weight)]
    if bias:
        rules.append(rule(f"{torch_prefix}.bias", f"{jax_prefix}.bias"))
    return rules


def norm(torch_prefix: str, jax_prefix: str, bias: bool = False, weight_name: str = "weight") -> list[Rule]:
    """Norm scale (and shift): torch ``{p}.weight`` <-> JAX ``{q}.weight`` (same layout)."""
    rules = [rule(f"{torch_prefix}.{weight_name}", f"{jax_prefix}.weight")]
    if bias:
        rules.append(rule(f"{torch_prefix}.bias", f"{jax_prefix}.bias"))
    return rules


def same_names(name: str, jax_shapes: AnyMapping[str, Shape]) -> Mapping:
    """A table for modules whose torch and JAX names agree (one concrete rule per JAX parameter): ``*.kernel`` <->
    ``*.weight`` (2-D: Linear transpose, 4-D: Conv2d permute), ``*.embedding`` <-> ``*.weight``, the rest as is."""
    rules = []
    for path, shape in jax_shapes.items():
        stem, _, leaf = path.rpartition(".")
        torch_name = f"{stem}.weight" if stem and leaf in ("kernel", "embedding") else path
        if leaf != "kernel":
            transform: Transform = IDENTITY
        elif len(shape) in (2, 4):
            transform = LINEAR if len(shape) == 2 else CONV2D
        else:
            raise ConversionError(f"{path}: no same-name layout for a rank-{len(shape)} kernel {tuple(shape)}")
        rules.append(rule(torch_name, path, transform))
    return Mapping(name, tuple(rules))


def _fill(pattern: str, env: dict[str, str]) -> str:
    return _WILDCARD.sub(lambda m: env[m.group(1)], pattern)


def _wildcards(patterns: Sequence[str]) -> list[str]:
    return sorted({w for p in patterns for w in _WILDCARD.findall(p)})


@dataclasses.dataclass(frozen=True)
class ConcreteRule:
    """A rule with its wildcards filled in."""

    torch: tuple[str, ...]
    jax: tuple[str, ...]
    transform: Transform


@dataclasses.dataclass(frozen=True)
class Mapping:
    """A named list of rules plus the ranges of their wildcards (e.g. ``{"i": num_layers}``)."""

    name: str
    rules: tuple[Rule, ...]
    counts: tuple[tuple[str, int], ...] = ()

    def concrete(self) -> list[ConcreteRule]:
        """Every rule with each wildcard expanded over its range, in table order."""
        counts = dict(self.counts)
        out = []
        for r in self.rules:
            names = _wildcards(r.torch + r.jax)
            missing = [n for n in names if n not in counts]
            if missing:
                raise ValueError(f"mapping {self.name!r}: no count for wildcard(s) {missing} in {r}")
            for values in itertools.product(*(range(counts[n]) for n in names)):
                env = dict(zip(names, map(str, values)))
                torch_names = tuple(_fill(p, env) for p in r.torch)
                out.append(ConcreteRule(torch_names, tuple(_fill(p, env) for p in r.jax), r.transform))
        return out

    def with_prefix(self, torch_prefix: str = "", jax_prefix: str = "") -> Mapping:
        """The same table under a torch key prefix (``pipe.dit.``) and/or a JAX path prefix (``dit.``)."""
        rules = tuple(
            Rule(tuple(torch_prefix + t for t in r.torch), tuple(jax_prefix + j for j in r.jax), r.transform)
            for r in self.rules
        )
        return dataclasses.replace(self, rules=rules)


def combine(name: str, *mappings: Mapping) -> Mapping:
    """Concatenate tables (wildcard counts must agree where two tables share a wildcard name)."""
    counts: dict[str, int] = {}
    for m in mappings:
        for k, v in m.counts:
            if counts.setdefault(k, v) != v:
                raise ValueError(f"wildcard {k!r} has count {counts[k]} in one table and {v} in another")
    return Mapping(name, tuple(r for m in mappings for r in m.rules), tuple(counts.items()))


# ------------------------------------------------------------------------------------------------------------- planning
@dataclasses.dataclass(frozen=True)
class Step:
    """One conversion step: read ``inputs`` (with ``input_shapes``), write ``outputs`` (with ``output_shapes``)."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    input_shapes: tuple[Shape, ...]
    output_shapes: tuple[Shape, ...]
    run: Callable[[Sequence[np.ndarray]], list[np.ndarray]]


def _check_names(expected: list[str], present: AnyMapping[str, Shape], where: str, what: str) -> list[Exception]:
    errors: list[Exception] = []
    dup = sorted({n for n in expected if expected.count(n) > 1}) if len(set(expected)) != len(expected) else []
    if dup:
        errors.append(ConversionError(f"mapping table names these {what} more than once: {', '.join(dup[:20])}"))
    missing = [n for n in expected if n not in present]
    unexpected = sorted(set(present) - set(expected))
    if missing:
        errors.append(MissingTensorsError(missing, where))
    if unexpected:
        errors.append(UnexpectedTensorsError(unexpected, where))
    return errors


def _raise(errors: list[Exception]) -> None:
    if len(errors) == 1:
        raise errors[0]
    if errors:
        err = ConversionError("\n".join(str(e) for e in errors))
        err.parts = errors  # type: ignore[attr-defined]
        raise err


def plan(
    mapping: Mapping,
    source: AnyMapping[str, Shape],
    target: AnyMapping[str, Shape] | None,
    direction: str,
    source_name: str = "the source checkpoint",
    target_name: str = "the target model",
) -> list[Step]:
    """Validate names and shapes, then return the conversion steps in table order.

    ``direction`` is ``"to_jax"`` (source = torch names -> shapes, target = JAX paths -> shapes) or ``"to_torch"``
    (source = JAX paths, target = torch names). ``target=None`` derives the target shapes from the source (export
    to new files). Raises a :class:`ConversionError` listing missing, unexpected and
    mis-shaped tensors of the source, and target entries that no rule produces.
    """
    if direction not in ("to_jax", "to_torch"):
        raise ValueError(f"direction must be 'to_jax' or 'to_torch', got {direction!r}")
    rules = mapping.concrete()
    to_jax = direction == "to_jax"
    ins = lambda r: r.torch if to_jax else r.jax
    outs = lambda r: r.jax if to_jax else r.torch
    errors = _check_names([n for r in rules for n in ins(r)], source, source_name, "source tensors")
    if target is None:
        _raise(errors)
        target = output_shapes(mapping, source, direction)
    errors += _check_names(
        [n for r in rules for n in outs(r)], target, target_name + f" ({mapping.name} table)", "target tensors"
    )
    _raise(errors)

    steps, bad = [], {}
    for r in rules:
        tgt_shapes = [tuple(target[n]) for n in outs(r)]
        back = r.transform.torch_shapes if to_jax else r.transform.jax_shapes
        try:
            want = back(tgt_shapes)
        except (ConversionError, ValueError) as e:  # rank mismatch in the target itself
            raise ConversionError(f"mapping {mapping.name!r} cannot map {outs(r)} with shapes {tgt_shapes}: {e}") from e
        for n, w in zip(ins(r), want):
            if tuple(source[n]) != tuple(w):
                bad[n] = (tuple(source[n]), tuple(w))
        run = r.transform.to_jax if to_jax else r.transform.to_torch
        steps.append(Step(ins(r), outs(r), tuple(tuple(source[n]) for n in ins(r)), tuple(tgt_shapes), run))
    if bad:
        raise ShapeMismatchError(bad, source_name)
    return steps


def output_shapes(mapping: Mapping, source: AnyMapping[str, Shape], direction: str) -> dict[str, Shape]:
    """Target names -> shapes implied by the source shapes (no target model needed; used to plan a writer)."""
    out: dict[str, Shape] = {}
    for r in mapping.concrete():
        ins, outs = (r.torch, r.jax) if direction == "to_jax" else (r.jax, r.torch)
        missing = [n for n in ins if n not in source]
        if missing:
            raise MissingTensorsError(missing, "the source checkpoint")
        fwd = r.transform.jax_shapes if direction == "to_jax" else r.transform.torch_shapes
        out.update(zip(outs, fwd([tuple(source[n]) for n in ins])))
    return out


def execute(
    steps: Sequence[Step], read: Callable[[str], np.ndarray], prefetch: bool = False
) -> Iterator[tuple[str, np.ndarray]]:
    """Stream ``(output name, array)`` pairs: each step reads only its own inputs, so at most one rule's tensors
    are alive at a time (plus whatever the consumer keeps). ``prefetch`` reads and transforms the next step in a
    background thread while the current step's outputs are consumed (one more step of memory)."""
    if not prefetch:
        for step in steps:
            yield from _run_step(step, [read(n) for n in step.inputs])
        return
    from concurrent.futures import ThreadPoolExecutor

    def produce(step: Step) -> list[tuple[str, np.ndarray]]:
        return list(_run_step(step, [read(n) for n in step.inputs]))

    with ThreadPoolExecutor(1, thread_name_prefix="conversion-read") as pool:
        pending = pool.submit(produce, steps[0]) if steps else None
        for i in range(len(steps)):
            outputs = pending.result()
            pending = pool.submit(produce, steps[i + 1]) if i + 1 < len(steps) else None
            yield from outputs
            del outputs


def _run_step(step: Step, xs: list[np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    for n, x, want in zip(step.inputs, xs, step.input_shapes):
        if tuple(x.shape) != tuple(want):
            raise ShapeMismatchError({n: (tuple(x.shape), tuple(want))}, "the source data")
    ys = step.run(xs)
    xs.clear()
    yield from zip(step.outputs, ys)
