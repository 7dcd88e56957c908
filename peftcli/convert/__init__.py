"""`peftcli convert`: one-command migration from Axolotl and LLaMA-Factory training configs.

Each converter reads the other tool's config into a `Ledger` (ledger.py), which holds the recipe
being built and what happened to every key: carried, not carried (with the reason and what to do
instead), changed on the way, or filled with that tool's default. The written recipe lists all of
that at its top, and the command says it on stderr: nothing is dropped silently.
"""

from peftcli.convert.axolotl import convert as from_axolotl
from peftcli.convert.ledger import Ledger
from peftcli.convert.llamafactory import convert as from_llamafactory
from peftcli.convert.llamafactory import data_only as llamafactory_data

__all__ = ["Ledger", "from_axolotl", "from_llamafactory", "llamafactory_data"]
