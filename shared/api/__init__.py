"""The HTTP API (architecture §6): :func:`create_app` builds it from :class:`~shared.services.Services`."""

from shared.api.app import create_app

__all__ = ["create_app"]
