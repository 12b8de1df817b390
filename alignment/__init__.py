"""alignment: Hydra-composed SFT and DPO runs on TRL.

`python -m alignment` runs the offline tiny demo; `python -m alignment --help` lists the config groups.
"""

__version__ = "0.1.0"
