"""Path helpers for plain nested-dict parameter trees ("encoder/block/0/layer/0/SelfAttention/q/kernel")."""

from __future__ import annotations

from typing import Any, Mapping

from flax import traverse_util

SEP = "/"


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dict -> {"a/b/c": leaf}; integer keys (list indices in an NNX state) become their digits."""
    return {SEP.join(map(str, path)): leaf for path, leaf in traverse_util.flatten_dict(dict(tree)).items()}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"a/b/c": leaf} -> nested dict."""
    return traverse_util.unflatten_dict(dict(flat), sep=SEP)


def tree_bytes(tree: Mapping[str, Any]) -> int:
    """Total bytes of all array leaves."""
    return sum(int(v.size) * v.dtype.itemsize for v in flatten(tree).values())
