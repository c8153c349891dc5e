"""Fingerprints of what a cached answer depends on: the code of a class and the numbers in tensors.

A cache keyed only by a class's name and settings reuses stale answers after the class's code or its buffers
change; these digests go into the keys so that such a change gives a new key.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from collections.abc import Iterable, Mapping
from types import CodeType

import torch
from torch import Tensor


def _bytecode(code: CodeType) -> bytes:
    """The instructions, names and constants of a code object and of the code objects nested in it."""
    parts = [code.co_code, repr(code.co_names).encode()]
    for const in code.co_consts:
        parts.append(_bytecode(const) if isinstance(const, CodeType) else repr(const).encode())
    return b"|".join(parts)


@functools.cache
def _class_source(cls: type) -> bytes:
    """The source of ``cls`` alone or, where it is unavailable (a class made by ``exec``, a module no longer in
    ``sys.modules``, a build without sources), its name and the bytecode of the functions it defines."""
    try:
        return inspect.getsource(cls).encode()
    except (OSError, TypeError):
        parts = [f"{cls.__module__}.{cls.__qualname__}: {sorted(vars(cls))}".encode()]
        for name, attribute in sorted(vars(cls).items()):
            function = getattr(attribute, "__func__", attribute)  # a staticmethod or classmethod's function
            if isinstance(getattr(function, "__code__", None), CodeType):
                parts.append(name.encode() + b"=" + _bytecode(function.__code__))
        return b"|".join(parts)


def code_digest(cls: type, base: type) -> str:
    """A hex digest of the source of ``cls`` and of every class in its MRO below ``base`` (``base`` itself, its
    ancestors and classes from ``torch`` or the standard library are left out: they do not define the problem)."""
    digest = hashlib.sha256()
    skipped = set(base.__mro__)
    for klass in cls.__mro__:
        if klass in skipped or klass.__module__.split(".")[0] in ("torch", "abc", "typing"):
            continue
        digest.update(_class_source(klass))
    return digest.hexdigest()


def tensor_digest(tensors: Tensor | Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]) -> str:
    """A hex digest of the names, dtypes, shapes and values of a tensor, a dict of tensors or ``(name, tensor)``
    pairs (sorted by name first, so the order they come in does not matter)."""
    if isinstance(tensors, Tensor):
        items = [("", tensors)]
    else:
        items = sorted(tensors.items() if isinstance(tensors, Mapping) else tensors, key=lambda item: item[0])
    digest = hashlib.sha256()
    for name, tensor in items:
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
