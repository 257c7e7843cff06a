"""What a model family declares, checked in one place: hyperparameters and neighbor normalisation.

Hyperparameters are declared once, as the keyword parameters (with defaults) of the network's
constructor ``__init__(self, num_types, cutoff, **hparams)``; ``hparam_defaults`` reads them from
the signature. A family may check their values in a classmethod
``validate_hparams(cutoff, hparams)`` (``hparams`` complete, defaults filled in) that raises
``ValueError`` with one line naming the key, the value and what is allowed; ``resolve_hparams``
runs it with the check of unknown keys. Families that derive from ``Network`` get both checks when
they are constructed directly too (``NequIP(3, 5.0, num_featurs=8)`` names ``num_features``).

Neighbor normalisation, one convention for every family: sums over neighbors are divided by
n_avg, the mean number of neighbors per atom. The hyperparameter ``avg_num_neighbors`` (where a
family offers it) fixes n_avg; otherwise ``fit_statistics`` sets it to ``mean_neighbor_count`` of
the training structures (pairs / atoms, at least 1), and before that each family keeps its own
starting value (Deep Potential: ``uniform_neighbor_count`` at liquid-water density; NequIP: at 0.1
atoms/A^3; EGNN: 1), so models and checkpoints made before this module give the same numbers.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import math
import typing
from typing import Any, Dict, Iterable, Optional, Sequence, Union

from torch import nn

_FIXED = ("self", "num_types", "cutoff")


# ---------------------------------------------------------------------------- hyperparameters
def _init_parameters(cls) -> Dict[str, inspect.Parameter]:
    """The keyword hyperparameters of ``cls.__init__`` (after num_types and cutoff)."""
    params = inspect.signature(cls.__init__).parameters
    return {name: p for name, p in params.items() if name not in _FIXED
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _plain(value: Any) -> Any:
    """Tuples as lists (a default's JSON form, as stored in configs)."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def hparam_defaults(cls) -> Dict[str, Any]:
    """Every hyperparameter of a network class with its default, read from the constructor's
    signature (tuples as lists, as a config stores them)."""
    out = {}
    for name, p in _init_parameters(cls).items():
        if p.default is p.empty:
            raise TypeError(f"{cls.__name__}.__init__: hyperparameter '{name}' has no default; "
                            "every parameter after (num_types, cutoff) needs one")
        out[name] = _plain(p.default)
    return out


def unknown_hparam_error(family: str, key: str, valid: Iterable[str]) -> ValueError:
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ValueError(f"model '{family}' has no hyperparameter '{key}'.{hint} Valid: {valid}")


def check_cutoff(cutoff: Any) -> float:
    """The cutoff as a float; ValueError unless it is a finite number > 0."""
    if isinstance(cutoff, bool) or not isinstance(cutoff, (int, float)) \
            or not math.isfinite(cutoff) or cutoff <= 0:
        raise ValueError(f"cutoff = {cutoff!r}: must be a number of Angstrom > 0")
    return float(cutoff)


def _number_from_string(cls, key: str, value: Any) -> Any:
    """A number written as a string ('1e-3', as YAML 1.1 reads it) for a hyperparameter
    declared as a number; anything else unchanged (``validate_hparams`` judges it)."""
    if not isinstance(value, str):
        return value
    try:
        hint = typing.get_type_hints(cls.__init__).get(key)
    except Exception:  # noqa: BLE001 - a plugin's annotations need not resolve: no conversion
        return value
    kinds = set(typing.get_args(hint)) if typing.get_origin(hint) is Union else {hint}
    try:
        number = float(value)
    except ValueError:
        return value
    if float in kinds and math.isfinite(number):
        return number
    if int in kinds and math.isfinite(number) and number == int(number):
        return int(number)
    return value


def resolve_hparams(cls, hparams: Dict[str, Any], cutoff: Any = None,
                    family: Optional[str] = None) -> Dict[str, Any]:
    """The defaults of ``cls`` updated by ``hparams``, checked: an unknown key is a ValueError
    naming the closest valid one; values go through ``cls.validate_hparams`` (when defined) with
    ``cutoff`` (checked to be > 0; the family's DEFAULT_CUTOFF when None)."""
    family = family or cls.__name__
    defaults = hparam_defaults(cls)
    for key in hparams:
        if key not in defaults:
            raise unknown_hparam_error(family, key, defaults)
    hp = {**defaults, **{k: _number_from_string(cls, k, _plain(v)) for k, v in hparams.items()}}
    cutoff = check_cutoff(cls.DEFAULT_CUTOFF if cutoff is None else cutoff)
    validate = getattr(cls, "validate_hparams", None)
    if validate is not None:
        try:
            validate(cutoff, hp)
        except (TypeError, ValueError) as err:
            raise ValueError(f"model '{family}': {err}") from None
    return hp


class Network(nn.Module):
    """Optional base class of a model family's network: constructing a subclass directly checks
    its hyperparameters as ``build_model`` does (unknown keys with the closest valid name, then
    ``validate_hparams``). Subclasses set ``DEFAULT_CUTOFF`` and may override
    ``validate_hparams``."""

    DEFAULT_CUTOFF: float  # set by every family (Angstrom)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)
        var_kw = next((n for n, p in signature.parameters.items() if p.kind == p.VAR_KEYWORD),
                      None)

        @functools.wraps(init)
        def checked_init(self, *args, **kw):
            if type(self).__init__ is checked_init:  # not when called by a subclass's init
                if var_kw is None:
                    for key in kw:
                        if key not in signature.parameters:
                            raise unknown_hparam_error(cls.__name__, key, hparam_defaults(cls))
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                given = {k: v for k, v in bound.arguments.items() if k not in _FIXED}
                extra = given.pop(var_kw, {}) if var_kw is not None else {}
                resolve_hparams(cls, {**given, **extra}, bound.arguments.get("cutoff"))
            init(self, *args, **kw)

        cls.__init__ = checked_init

    @classmethod
    def validate_hparams(cls, cutoff: float, hparams: Dict[str, Any]) -> None:
        """Raise ValueError (one line: key, value, what is allowed) for a bad value."""


# checks of single values, for validate_hparams; each raises ValueError naming the key
def _is_int(v: Any) -> bool:
    """An integer, or a float with an integral value (32.0, as older configs may hold)."""
    if isinstance(v, float):
        return math.isfinite(v) and v == int(v)
    return isinstance(v, int) and not isinstance(v, bool)


def need_int(hp: Dict[str, Any], key: str, minimum: int = 1) -> int:
    v = hp[key]
    if not _is_int(v) or v < minimum:
        raise ValueError(f"hyperparameter {key} = {v!r}: must be an integer >= {minimum}")
    return v


def need_number(hp: Dict[str, Any], key: str, minimum: float = 0.0, strict: bool = True,
                optional: bool = False) -> Optional[float]:
    v = hp[key]
    if v is None and optional:
        return None
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
        and (v > minimum if strict else v >= minimum)
    if not ok:
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        none = " (or null)" if optional else ""
        raise ValueError(f"hyperparameter {key} = {v!r}: must be a number {bound}{none}")
    return float(v)


def need_bool(hp: Dict[str, Any], key: str) -> bool:
    v = hp[key]
    if not isinstance(v, bool):
        raise ValueError(f"hyperparameter {key} = {v!r}: must be true or false")
    return v


def need_widths(hp: Dict[str, Any], key: str, allow_empty: bool = False) -> Sequence[int]:
    v = hp[key]
    ok = isinstance(v, (list, tuple)) and (allow_empty or len(v) > 0) \
        and all(_is_int(w) and w >= 1 for w in v)
    if not ok:
        what = "a list" if allow_empty else "a non-empty list"
        raise ValueError(f"hyperparameter {key} = {v!r}: must be {what} of integer widths >= 1")
    return v


def need_choice(hp: Dict[str, Any], key: str, options: Sequence[Any]) -> Any:
    v = hp[key]
    if isinstance(v, bool) or v not in options:
        raise ValueError(f"hyperparameter {key} = {v!r}: must be one of {list(options)}")
    return v


# ---------------------------------------------------------------------------- neighbor counts
def uniform_neighbor_count(cutoff: float, density: float) -> float:
    """Neighbors inside the cutoff sphere at a uniform ``density`` (atoms/A^3): a starting n_avg
    before the data are seen."""
    return density * 4.0 / 3.0 * math.pi * float(cutoff) ** 3


def mean_neighbor_count(samples) -> Optional[float]:
    """n_avg from training structures: pairs / atoms over ``samples`` ((atom_types, edge_index,
    edge_vectors) tuples), at least 1; None when there are no atoms or no pairs (keep the value
    in use)."""
    pairs = sum(int(s[1].shape[1]) for s in samples)
    atoms = sum(int(s[0].shape[0]) for s in samples)
    if pairs == 0 or atoms == 0:
        return None
    return max(pairs / atoms, 1.0)
