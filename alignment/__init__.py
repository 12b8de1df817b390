"""alignment: Hydra-composed SFT and DPO runs on TRL.

`python -m alignment` runs the offline tiny demo; `python -m alignment --help` lists the config groups.
"""

__version__ = "0.1.0"
# Lets the entrypoint tell our package from another module named `alignment` (alignment-handbook
# installs one) that shadows it on sys.path.
DISTRIBUTION = "alignment-recipes"
