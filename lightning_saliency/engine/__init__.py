"""The engine: ``explain()`` and everything it stands on.

One safety context around every method (:mod:`.explanations`), typed options (:mod:`.options`),
target layers and their layouts (:mod:`.layers`), sharded models (:mod:`.sharded`), and the
methods themselves, each describing itself in the registry (:mod:`.methods`). It imports
nothing from the rest of the package but ``errors`` and ``console``.
"""
