"""Pixel tensors by reference: into Ray's object store where Ray runs, as themselves elsewhere."""

from __future__ import annotations


def publish(arrays: list) -> list:
    """Object references to `arrays` inside a Ray worker; the arrays themselves elsewhere."""
    import ray

    return [ray.put(a) for a in arrays] if ray.is_initialized() else arrays


async def resolve(images: list) -> list:
    """The arrays behind `publish`'s result (references are fetched from the object store)."""
    import ray

    return [await item if isinstance(item, ray.ObjectRef) else item for item in images]
