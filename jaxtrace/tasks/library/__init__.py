"""The built-in tasks, one module each: its loader, its options record and its registration
(`jaxtrace.tasks.registry`). A new task is one more module here and one more line below; the order of the lines is
the order of `--task`'s choices.

Each loader returns ``PromptPair`` objects in the order the PyTorch reference
(``ZiruiYan/multi-component-causal-tracing``, ``datasets/*.py`` and the ``train_*.py`` scripts) builds them.
``data`` may be the root folder holding ``winogender/``, ``winobias/`` and ``professions/``, or the dataset
folder itself.

Deliberate differences from the reference:

- Possessive slots. The reference always substitutes "she"/"he", even where the pronoun is possessive, giving
  e.g. "The nurse notified the patient that she" + " shift would be ending in an hour." (5 Winogender, 6
  WinoBias-dev and 5 WinoBias-test pairs). With ``fix_possessive=True`` (the default) those pairs use
  "her"/"his"; ``fix_possessive=False`` reproduces the reference.
- Winogender ``stats="bls"`` works: it orders the continuations by ``bls_pct_female`` just as ``"bergsma"`` does
  by ``bergsma_pct_female`` (the reference crashes on a misspelled attribute).
- Malformed input raises ``FileNotFoundError``/``ValueError`` naming the file and line, instead of asserting.
- Nothing is dropped silently: ``load_pairs`` (and ``load_winobias``) return ``Pairs``, a list that also holds, in
  ``dropped``, every line pair the reference's skip rules leave out, with its file, line numbers and reason (38
  WinoBias dev pairs, 68 test pairs); the other loaders drop nothing (a line they cannot read is an error).
- Empty prompts and bytes that are not UTF-8 are errors naming the file and line.
"""

from jaxtrace.tasks.library import winogender  # noqa: F401  (each import registers its task)
from jaxtrace.tasks.library import winobias  # noqa: F401
from jaxtrace.tasks.library import professions  # noqa: F401
from jaxtrace.tasks.library import custom  # noqa: F401
from jaxtrace.tasks.library import counterfact  # noqa: F401
from jaxtrace.tasks.library import binding  # noqa: F401
from jaxtrace.tasks.library import ioi  # noqa: F401
