"""Plug-ins installed outside mrmae: a distribution lists its modules under an entry-point
group, and every command finds them where it finds the built-in ones.

    [project.entry-points."mrmae.teachers"]   toy = "my_pkg.toy_teacher"    (KIND = the name)
    [project.entry-points."mrmae.masks"]      toy = "my_pkg.toy_mask"
    [project.entry-points."mrmae.students"]   toy = "my_pkg.toy_student"

Each module registers as a file of mrmae's own folder does (`@register_teacher`,
`@register_mask`, `@register_family`) when it is imported; the registry imports the group's
modules right after its own. Cache backends get their group (`mrmae.backends`) with the
backend interface (CACHE_FORMAT.md). A plug-in that does not import is one warning naming it
and its group, not a broken command.
"""

from __future__ import annotations

import importlib
import warnings
from importlib.metadata import entry_points

GROUPS = ("mrmae.teachers", "mrmae.masks", "mrmae.students", "mrmae.backends")


def plugin_names(group: str) -> list[str]:
    """The names registered under `group` by installed distributions, without importing them."""
    return sorted({ep.name for ep in entry_points(group=group)})


def load_plugins(group: str) -> list[str]:
    """Import each module registered under the entry-point group `group` (its registrations are
    the import's side effect); returns the names that loaded."""
    loaded = []
    for ep in sorted(entry_points(group=group), key=lambda e: e.name):
        try:
            importlib.import_module(ep.value.split(":", 1)[0])
        except Exception as e:  # a broken plug-in must not break the commands that do not need it
            warnings.warn(f"plug-in {ep.name} ({ep.value}) of {group} does not import: {type(e).__name__}: {e}")
            continue
        loaded.append(ep.name)
    return loaded
