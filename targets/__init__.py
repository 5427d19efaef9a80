"""Target profiles as YAML data plus their loader."""

from targets.profile import (
    Cache,
    StaticShapes,
    TargetProfile,
    Tolerance,
    builtin_target_names,
    is_profile_path,
    list_targets,
    load_target,
)

__all__ = [
    "Cache",
    "StaticShapes",
    "TargetProfile",
    "Tolerance",
    "builtin_target_names",
    "is_profile_path",
    "list_targets",
    "load_target",
]
