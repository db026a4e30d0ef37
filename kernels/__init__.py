"""Triton kernels for the ConvNeXt and attention blocks of Stable Cascade, each beside its reference.

One op per module (kernel ``_<op>_kernel``, launcher ``<op>()``, reference ``<op>_ref()``), all on NHWC
activations:

* ``dwconv_layernorm``  depthwise 3x3 conv + LayerNorm over C (ResBlock, first half)
* ``gelu_grn``          exact GELU + GlobalResponseNorm (ResBlock MLP middle), 3 reads/writes per element
* ``modulation``        TimestepBlock ``x*(1+a)+b``, optionally + residual and + LayerNorm output
* ``attention``         flash attention over [image K/V from the fused QKV buffer ; conditioning K/V]
* ``stage_a_block``     Stage A: LayerNorm + gammas, replication-padded dwconv + scale + residual
* ``backend``           ``apply_triton_kernels(model)``: the ``triton`` backend (module class swap)

Nothing is imported here (no import-time side effects). On a CPU the kernels run through the Triton
interpreter: ``TRITON_INTERPRET=1`` must be set before these modules are imported.
"""
