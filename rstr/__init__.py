"""rstr: sparse guidance schedules, merged calibration and compiled step plans for diffusion transformers."""

from rstr.errors import RstrError
from rstr.schedule import GuidanceSchedule

__version__ = "0.1.0"
__all__ = ["GuidanceSchedule", "RstrError", "__version__"]
