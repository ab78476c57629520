"""The model: its architecture description, the HF <-> Megatron weight mapping, one file per
family, and the Megatron model builder.

Importing this package registers every family in ``families/`` (its config parser in
:mod:`.architecture`, its weight mapping in :mod:`.weight_mapping`): the plugins import the
leaves they register into, never the other way round.
"""

from . import families  # noqa: F401  (registers the families)
