"""The keyword arguments of a release yaml's ``!new:`` node over upstream's constructor defaults, checked.

The encoder and flow builders (:mod:`.conformer`, :mod:`.flows`) read every node through :func:`read_options`
and refuse, naming it, any value they do not implement with :func:`require`.
"""

from __future__ import annotations

import logging
from typing import Any

from audiotune.models.flow.io import FlowLoadError

log = logging.getLogger(__name__)


def read_options(node, defaults: dict[str, Any], required: tuple[str, ...] = (),
                 extra_ok: bool = False) -> dict[str, Any]:
    """The node's keyword arguments over upstream's ``defaults``.

    Raises:
        FlowLoadError: positional arguments, a missing required key, or (unless ``extra_ok``) a key the
            upstream constructor does not take.
    """
    if node.args:
        raise FlowLoadError(f"{node.cls}: positional arguments are not supported")
    missing = [key for key in required if key not in node.kwargs]
    if missing:
        raise FlowLoadError(f"{node.cls}: missing option(s) {', '.join(missing)}")
    unknown = sorted(set(node.kwargs) - set(defaults) - set(required))
    if unknown and not extra_ok:
        raise FlowLoadError(f"{node.cls}: unsupported option(s) {', '.join(unknown)}")
    if unknown:
        log.warning("%s: ignoring option(s) %s (upstream ignores them too)", node.cls, ", ".join(unknown))
    return {**defaults, **{k: v for k, v in node.kwargs.items() if k not in unknown}}


def require(node, options: dict[str, Any], key: str, allowed) -> None:
    """FlowLoadError naming ``key`` unless ``options[key]`` is one of ``allowed``."""
    if options[key] not in allowed:
        raise FlowLoadError(f"{node.cls}: {key}={options[key]!r} is not supported (supported: "
                            f"{', '.join(repr(a) for a in allowed)})")
