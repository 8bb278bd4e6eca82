"""A parameter tree built from checkpoint tensors read one at a time: the streaming load behind every `load_pretrained`.

Every name and shape is checked before any tensor is read. Then each tensor is read (`hf_io.Tensor`), cast to the
requested dtype, quantized if its module is chosen (`quantize="nf4" | "int8"`, `jpeft.quant`, jitted on the device)
and placed on its device, or straight into its shards of a mesh, before the next is read: the host holds the finished
tree plus about one tensor. The largest tensors go first, so their transient copies (the embedding, the LM head)
coincide with a nearly empty tree rather than a full one.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import quant, tree
from jpeft.formats.hf_io import CheckpointError, Tensor


def build(
    flat: Mapping[str, Tensor],
    expected: Mapping[str, tuple[int, ...]],
    to_hf: Callable[[str], tuple[str, bool]],
    source: str,
    what: str,
    dtype: Any,
    unexpected: list[str] = (),
    packed: Mapping[str, Tensor] | None = None,
    quantize: str | None = None,
    mesh: Any = None,
) -> dict:
    """The nested parameter tree of `flat` ({tree path: tensor in the tree's layout}) once every name and shape
    matches `expected`, else one clear error naming tensors as the checkpoint does (`to_hf(path) -> (name, transposed)`).

    Float tensors are cast to `dtype`; `packed` leaves (GGUF blocks kept quantized, checked by the caller) keep theirs.
    `quantize` replaces the kernels `quant.select` picks by their quantized groups as they are read; `mesh` (a
    `jax.sharding.Mesh`) places every leaf by `jpeft.sharding`'s rules.
    """
    check(flat, expected, to_hf, source, what, unexpected)
    packed = dict(packed or {})
    shapes = {**{p: jax.ShapeDtypeStruct(t.shape, dtype) for p, t in flat.items()},
              **{p: jax.ShapeDtypeStruct(t.shape, jnp.uint8) for p, t in packed.items()}}
    chosen = set()
    if quantize is not None:
        chosen = {f"{m.replace('.', '/')}/{quant.KERNEL}" for m in quant.select(tree.unflatten(shapes), quantize)}
    place = _placer(shapes, chosen, quantize, mesh)
    sizes = {p: int(np.prod(s.shape)) * s.dtype.itemsize for p, s in shapes.items()}
    out = {}
    for path in sorted(sizes, key=lambda p: (-sizes[p], p)):
        value = (flat.get(path) or packed[path]).read()
        if path in chosen:
            module = path.rsplit("/", 1)[0]
            placed = {f"{module}/{leaf}": place(f"{module}/{leaf}", v)
                      for leaf, v in quant.quantize_matrix(jnp.asarray(value, dtype), quantize).items()}
        else:
            placed = {path: place(path, jnp.asarray(value, dtype) if path in flat else jnp.asarray(value))}
        # Done before the next read: dispatch is asynchronous, and a reader running ahead of the quantizer kept dozens
        # of tensors in flight (a 1B NF4 load peaked at 2.3x its tree).
        out.update(jax.block_until_ready(placed))
        del value, placed
    return tree.unflatten(out)


def check(flat: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]], to_hf: Callable[[str], tuple[str, bool]],
          source: str, what: str, unexpected: list[str] = ()) -> None:
    """One clear error for tensors the model lacks, tensors the checkpoint lacks, or a shape the config disagrees with."""
    unexpected = list(unexpected) + [to_hf(p)[0] for p in flat if p not in expected]
    if unexpected:
        raise CheckpointError(f"{source} holds tensors {what} with this config does not have: {sorted(unexpected)[:8]}")
    missing = [to_hf(p)[0] for p in expected if p not in flat]
    if missing:
        raise CheckpointError(f"{source} is missing tensors: {sorted(missing)[:8]}" + (" ..." if len(missing) > 8 else ""))
    for path, shape in expected.items():
        if tuple(flat[path].shape) != tuple(shape):
            hf_name, transposed = to_hf(path)
            pt = lambda s: (*s[:-2], s[-1], s[-2]) if transposed else tuple(s)  # noqa: E731  (PyTorch's (out, in), experts leading)
            got, want = pt(flat[path].shape), pt(shape)
            raise CheckpointError(f"{source}: tensor {hf_name} has shape {tuple(got)} but the config implies {tuple(want)}")


def _placer(shapes: Mapping[str, jax.ShapeDtypeStruct], chosen: set[str], quantize: str | None, mesh: Any) -> Callable[[str, jax.Array], jax.Array]:
    """`place(path, array)`: the array as is (on the default device), or on its sharding of `mesh`."""
    if mesh is None:
        return lambda path, x: x
    from jpeft.training import sharding  # only with a mesh; formats sit below training

    final = {p: s for p, s in shapes.items() if p not in chosen}
    for path in chosen:  # the quantized groups' shapes, from the kernels' alone
        module = path.rsplit("/", 1)[0]
        final.update({f"{module}/{k}": v for k, v in jax.eval_shape(lambda w: quant.quantize_matrix(w, quantize), shapes[path]).items()})
    shardings = tree.flatten(sharding.param_shardings(tree.unflatten(final), mesh))
    return lambda path, x: sharding.place(x, shardings[path])
