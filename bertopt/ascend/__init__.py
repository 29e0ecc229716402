"""The Ascend target: what CANN's tools accept, fuse and compute, and bertopt's side of running them.

No Ascend device, CANN toolkit, `atc` or `ais_bench` exists where bertopt is built, so every behaviour
of theirs encoded here was read from public sources, cited beside the code or data that encodes it
(the project's notes: ``shared/notes/ascend-facts.md``). Where a behaviour varies by CANN version it is
data keyed by version (``bertopt/data/``), read by the passes, ``check``, the atc command and the
emulation alike, so one table decides.

Modules: ``cann`` (the CANN version as a target), ``soc`` (which chip: --soc or npu-smi), ``atc`` (the atc
command, running it), ``npu`` (the OM on a device through ais_bench), ``form`` (the attention form ATC's big
kernels match), ``layernorm`` (the LayerNorm spelling ATC fuses), ``legality`` (what a version's ONNX parser
takes), ``gates`` (the fusion passes' shape and chip conditions), ``fusion_result`` (what ATC says it fused),
``kernels`` (what its Gelu kernels compute), ``check`` (``bertopt check``: form, legality and fusion per block).
"""
