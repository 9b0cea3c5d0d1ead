"""Fixtures live in tests/fixtures/, one module per area, and are imported here."""

from tests.fixtures.runtime import *  # noqa: F403
from tests.fixtures.secrets import *  # noqa: F403
from tests.fixtures.simulator import *  # noqa: F403
from tests.fixtures.transport import *  # noqa: F403
