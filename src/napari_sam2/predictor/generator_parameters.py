"""The automatic mask generator's parameters as users give them (a dict, ``--auto-param KEY=VALUE``),
checked against :class:`AutomaticMaskGenerator`'s own signature."""

from __future__ import annotations

import inspect
import types
import typing

from .amg import AutomaticMaskGenerator

__all__ = ["generator_parameters"]


def generator_parameters(auto: dict | None) -> tuple[dict, int | None]:
    """``(AutomaticMaskGenerator keyword arguments, max_objects)`` from the ``auto`` dict of the notebook
    API / the ``--auto-param`` values of the CLI, checked (names and types) before any model is built:
    a wrong one would otherwise fail deep inside the generator, after minutes of loading."""
    params = dict(auto or {})
    max_objects = params.pop("max_objects", None)
    if max_objects is not None and (isinstance(max_objects, bool) or not isinstance(max_objects, int)):
        raise ValueError(f"automatic mask generator parameter max_objects must be an integer >= 1, got {max_objects!r}")
    if max_objects is not None and int(max_objects) < 1:
        raise ValueError(f"auto['max_objects'] must be >= 1, got {max_objects}")
    allowed = [p for p, v in inspect.signature(AutomaticMaskGenerator).parameters.items()
               if v.kind is not inspect.Parameter.VAR_KEYWORD and p != "model"]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"unknown automatic mask generator parameter(s) {', '.join(unknown)} in auto=; "
                         f"valid: {', '.join(allowed + ['max_objects'])}")
    if params.get("output_mode", "binary_mask") != "binary_mask":
        raise ValueError("auto['output_mode'] cannot be changed: seeding needs binary masks")
    signature = inspect.signature(AutomaticMaskGenerator, eval_str=True).parameters
    for key, value in params.items():
        _check_parameter_type(key, value, signature[key].annotation)
    params["output_mode"] = "binary_mask"
    return params, (None if max_objects is None else int(max_objects))


def _check_parameter_type(key: str, value, annotation) -> None:
    kinds = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    kinds = {typing.get_origin(k) or k for k in kinds}
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    accepted = ((value is None and type(None) in kinds) or (isinstance(value, bool) and bool in kinds)
                or (number and isinstance(value, int) and int in kinds) or (number and float in kinds)
                or (isinstance(value, str) and str in kinds)
                or (isinstance(value, (list, tuple)) and bool(kinds & {list, tuple})))
    if not accepted:
        names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
                 tuple: "a list", type(None): "null"}
        expected = " or ".join(dict.fromkeys(names.get(k, getattr(k, "__name__", str(k)))
                                             for k in sorted(kinds, key=lambda k: k is type(None))))
        raise ValueError(f"automatic mask generator parameter {key} must be {expected}, got {value!r} "
                         f"(e.g. {key}={_parameter_default(key)})")


def _parameter_default(key: str):
    default = inspect.signature(AutomaticMaskGenerator).parameters[key].default
    return "null" if default is None else str(default).lower() if isinstance(default, bool) else default
