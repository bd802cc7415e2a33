"""A recipe's own settings: the "extra" object of its training config, read into the recipe's dataclass.

TrainConfig holds what every training shares (steps, learning rate, batch, data); the knobs of one recipe (the
unet recipe's snr_gamma, LoRA's rank) live in the config's "extra" object. Each recipe declares them as a
RecipeSettings dataclass, a comment on each field, beside the function that trains with them (recipes.py,
finetune.py). RecipeSettings.from_extra is the one way they are read: a key the recipe does not have is refused
with the ones it does have, so that a misspelt setting stops the run instead of being quietly ignored; a value of
the wrong kind is refused too, and check() refuses values the recipe cannot use.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, ClassVar


@dataclasses.dataclass
class RecipeSettings:
    recipe: ClassVar[str] = ""  # the recipe's name, as errors say it

    @classmethod
    def from_extra(cls, extra: dict[str, Any]):
        """The settings in `extra`, the class's defaults for the rest."""
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in extra if k not in allowed]
        if unknown:
            guesses = [g for k in unknown for g in difflib.get_close_matches(k, allowed, n=1)]
            hint = f" (did you mean {', '.join(guesses)}?)" if guesses else ""
            raise ValueError(f"the {cls.recipe} recipe has no setting {', '.join(map(repr, unknown))} in extra{hint}; "
                             f"allowed: {', '.join(allowed)}")
        hints = typing.get_type_hints(cls)
        settings = cls(**{k: _typed(f"extra.{k} of the {cls.recipe} recipe", v, hints[k]) for k, v in extra.items()})
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse, in one sentence, values the recipe cannot use (each recipe adds its own rules)."""


_KINDS = {float: "a number", int: "a whole number", bool: "true or false", str: "a string", type(None): "null"}


def _typed(where: str, value: Any, hint: Any) -> Any:
    """`value` as the field's type (a whole number where a number is asked becomes a float; a JSON list where a
    tuple is asked, a tuple), or a ValueError saying what is wanted."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for kind in options:
        origin = typing.get_origin(kind) or kind
        if kind is type(None) and value is None:
            return None
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind in (int, bool, str) and isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
            return value
        if origin in (list, tuple) and isinstance(value, (list, tuple)) and all(_is_item(v, kind) for v in value):
            return origin(value)
    wanted = " or ".join(dict.fromkeys(_kind_name(k) for k in options))
    raise ValueError(f"{where} must be {wanted}, got {value!r}")


def _item_kind(hint: Any) -> type:
    """What a list field holds: its annotation's first argument (tuple[int, ...] -> int), strings if bare."""
    return (typing.get_args(hint) or (str,))[0]


def _is_item(value: Any, hint: Any) -> bool:
    kind = _item_kind(hint)
    return isinstance(value, kind) and (kind is not int or not isinstance(value, bool))


def _kind_name(hint: Any) -> str:
    origin = typing.get_origin(hint) or hint
    if origin in (list, tuple):
        return "a list of whole numbers" if _item_kind(hint) is int else "a list of strings"
    return _KINDS[origin]
