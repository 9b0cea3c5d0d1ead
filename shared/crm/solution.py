"""The Lead Writer solution rule: installed, and at the minimum version or later.

Used by the ``check_solution`` stage (on a cached version) and by live connection verification, so
the two can never disagree about what is supported or word the fix differently.
"""

from __future__ import annotations

from shared.errors import SolutionMissing, SolutionVersionUnsupported
from shared.settings import Settings, parse_version


def require_supported(version: str | None, settings: Settings) -> str:
    """Return ``version`` when it is installed and supported.

    Raises:
        SolutionMissing: ``version`` is None (the solutions query found nothing).
        SolutionVersionUnsupported: unreadable, or below ``LEADWRITER_MIN_SOLUTION_VERSION``.
    """
    name = settings.solution_name
    if version is None:
        raise SolutionMissing(
            f"the {name} solution is not installed in the CRM: import the Microsoft Marketplace Lead Writer "
            "solution in Dynamics (Settings → Solutions → Import)"
        )
    try:
        installed = parse_version(version)
    except ValueError:
        raise SolutionVersionUnsupported(
            f"the CRM reports an unreadable version {version!r} for the {name} solution; reinstall it"
        ) from None
    if installed < settings.min_version:
        raise SolutionVersionUnsupported(
            f"solution version {version} is installed; {settings.min_solution_version} or later is required: "
            "import the current Microsoft Marketplace Lead Writer solution"
        )
    return version
