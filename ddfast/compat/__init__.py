"""Drop-in replacements for the official recover hooks, backed by K1 (``ddfast.ops.moments``).

In your own recover script, swap one import line and keep the rest:

* SRe2L / CDA (``recover/utils.py``): ``from utils import BNFeatureHook`` -> ``from ddfast.compat.sre2l import BNFeatureHook``
* G-VBSM / EDC (``recover/utils.py``): ``from utils import BNFeatureHook, ConvFeatureHook`` ->
  ``from ddfast.compat.gvbsm import BNFeatureHook, ConvFeatureHook``

Same constructor arguments, same attributes the official loops read (``r_feature``, ``close()``; for G-VBSM the EMA
fields, ``drop_rate``, ``set_hook``/``save`` and the ``running_*`` statistics in the same ``running.npz``), the same
values (tests: float64 loss and input gradient to 1e-8 against the official statements). What changes is the work: the
channel and patch statistics of a layer come from one fused read of its input and their backward from one fused pass,
instead of ``permute(...).contiguous()``, ``var``, ``F.interpolate`` and einops copies with autograd graphs.
"""
