"""The benchmark suite behind ``lorakernels bench`` and ``pytest benchmarks``.

Modules, one concern each: :mod:`.workloads` (the one factory of layer workloads),
:mod:`.providers` (base, ours, merge, fuse, peft, loop), :mod:`.timing` (side-by-side medians),
:mod:`.runner` (check against the float64 oracle, then time), :mod:`.unet` (the SD1.5 UNet step),
:mod:`.report` (tables, JSON with provenance, plots, ``--compare``), :mod:`.cli`.
Everything here uses lorakernels' public API only.
"""
