"""The typed configuration schema (``hai.config.schema``), the bottom of HAI's imports.

Composition from Hydra's ``configs/`` tree is :func:`hai.config.compose.compose`.
"""

from hai.config.schema import *  # noqa: F401,F403
from hai.config.schema import __all__  # noqa: F401
