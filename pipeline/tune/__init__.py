"""``edgepipe tune``: search stage options per target on Ray Tune + Optuna (see README "Recipe search").

Ray and Optuna are the optional ``tune`` extra; importing this package does not import them.
"""

from pipeline.tune.spec import TuneSpec, load_tune, parse_tune

__all__ = ["TuneSpec", "load_tune", "parse_tune", "tune"]


def tune(*args, **kwargs):
    """See :func:`pipeline.tune.search.tune`."""
    from pipeline.tune.search import tune as _tune

    return _tune(*args, **kwargs)
