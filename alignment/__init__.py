"""alignment: Hydra-composed SFT and DPO runs on TRL.

`python -m alignment` runs the offline tiny demo; `python -m alignment --help` lists the config groups.
"""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes warns at import, on every CPU machine, that an optional CPU 4-bit kernel package is absent;
# it is not needed (4-bit training is a CUDA path), so the line would only be noise in every run log.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
