"""Name-to-object registries whose lookups fail with the list of known names."""

from __future__ import annotations

import difflib
from typing import Generic, Iterator, TypeVar

from jaxlab.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
  """An ordered mapping from names to objects of one kind (experiments, data sets, ...)."""

  def __init__(self, kind: str):
    self.kind = kind
    self._items: dict[str, T] = {}

  def register(self, name: str, item: T) -> T:
    if name in self._items:
      raise ValueError(f"{self.kind} {name!r} is already registered")
    self._items[name] = item
    return item

  def get(self, name: str) -> T:
    try:
      return self._items[name]
    except KeyError:
      known = ", ".join(self._items) or "(none)"
      close = difflib.get_close_matches(str(name), list(self._items), n=1, cutoff=0.8)
      hint = f"; did you mean {close[0]!r}?" if close else ""
      raise UnknownNameError(
          f"unknown {self.kind} {name!r}; known {self.kind}s: {known}{hint}") from None

  def names(self) -> list[str]:
    return list(self._items)

  def __contains__(self, name: object) -> bool:
    return name in self._items

  def __iter__(self) -> Iterator[str]:
    return iter(self._items)

  def __len__(self) -> int:
    return len(self._items)
