"""The one extension registry: passes, kernel templates and op lowerings register here by name.

    from fxforge.registry import registry
    @registry.register_pass
    class MyPass(fxforge.Pass): name = "my_pass"; ...

Users list ``registry.passes`` to see what a pipeline can name; duplicates are an error so that an
extension can never silently replace a built-in.
"""
from __future__ import annotations

from typing import Any, Callable


class Registry:
    def __init__(self) -> None:
        self.passes: dict[str, type] = {}
        self.templates: dict[str, Any] = {}
        self.lowerings: dict[Any, Callable] = {}

    def _add(self, table: dict, key, value, kind: str, replace: bool):
        if key in table and not replace:
            raise ValueError(f"{kind} {key!r} is already registered (pass replace=True to override)")
        table[key] = value
        return value

    def register_pass(self, cls=None, *, replace: bool = False):
        def deco(c):
            name = getattr(c, "name", None)
            if not name:
                raise ValueError(f"pass class {c.__name__} needs a non-empty `name`")
            return self._add(self.passes, name, c, "pass", replace)
        return deco(cls) if cls is not None else deco

    def register_template(self, name: str, template, *, replace: bool = False):
        return self._add(self.templates, name, template, "kernel template", replace)

    def register_lowering(self, op, fn=None, *, replace: bool = False):
        """Register how an ATen op becomes a Triton expression (see fxforge.codegen.ops)."""
        if fn is None:
            return lambda f: self.register_lowering(op, f, replace=replace)
        return self._add(self.lowerings, op, fn, "lowering", replace)

    def make_pass(self, name: str, **options):
        if name not in self.passes:
            raise KeyError(f"unknown pass {name!r}; registered passes: {sorted(self.passes)}")
        return self.passes[name](**options)


registry = Registry()
