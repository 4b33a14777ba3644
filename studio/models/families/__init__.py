"""Model families: one module each holds everything family-specific (studio/models/families/base.py says what).

`FAMILIES` maps a preset's `family:` to its family; it is read-only, built once at import.
"""

from __future__ import annotations

from types import MappingProxyType

from studio.models.families.base import TASKS, LatentFormat, ModelFamily, WorkingMemory
from studio.a1111.schedulers import GENERAL_SCHEDULERS
from studio.models.families.embedded import Embedded, EmbeddedFlux
from studio.models.families.flux import Flux
from studio.models.families.sd3 import StableDiffusion3
from studio.models.families.stable_diffusion import StableDiffusion1, StableDiffusion2, StableDiffusionXL

FAMILIES = MappingProxyType({family.name: family for family in (
    StableDiffusion1(), StableDiffusion2(), StableDiffusionXL(), StableDiffusion3(), Flux(), Embedded(),
    EmbeddedFlux())})


def family_named(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"Unknown model family {name!r}; expected one of {', '.join(FAMILIES)}.") from None


def family_of(preset) -> ModelFamily:
    """The family of a model preset (its `family:`)."""
    return family_named(preset.family)


def samplers_for(preset) -> tuple[str, ...]:
    """The samplers a preset allows: its own list, else its family's (flow-matching models), else every
    general-purpose one (not LCM)."""
    return preset.schedulers or family_of(preset).samplers or GENERAL_SCHEDULERS


def checkpoint_family(tensor_names) -> ModelFamily | None:
    """Which family an original-layout checkpoint is, from its tensor names (None when they do not say). The most
    specific test first: an SDXL file also has SD 1.x's CLIP under its conditioner."""
    for family in sorted(FAMILIES.values(), key=lambda family: -len(family.text_encoders)):
        if family.recognises(tensor_names):
            return family
    return None


def checkpoint_prefixes(component: str) -> tuple[str, ...]:
    """Where a component's tensors may sit in an original-layout checkpoint, across the families."""
    found: dict[str, None] = {}
    for family in FAMILIES.values():
        found.update(dict.fromkeys(family.checkpoint_prefixes.get(component, ())))
    return tuple(found)


def standalone_classes() -> dict[str, tuple[str, str]]:
    """(library, class) of each component a preset may take from a repo of its own, across the families."""
    found: dict[str, tuple[str, str]] = {}
    for family in FAMILIES.values():
        found.update(family.component_classes)
    return found


def weightless_components() -> tuple[str, ...]:
    """The components without weights (tokenizers, schedulers), across the families."""
    return tuple(dict.fromkeys(role for family in FAMILIES.values() for role in (*family.tokenizers, family.scheduler)))


__all__ = ["FAMILIES", "TASKS", "LatentFormat", "ModelFamily", "WorkingMemory", "checkpoint_family",
           "checkpoint_prefixes", "family_named", "family_of", "samplers_for", "standalone_classes",
           "weightless_components"]
