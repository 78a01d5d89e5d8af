"""Pictures on the device: colour maps, overlays, colour bars and captions (:mod:`.render`),
and what a person looks at (:mod:`.figures`: the grids, the overview, the timeline). Built on
:mod:`lightning_saliency.engine` only.
"""
