"""The Ascend target: what CANN's tools accept, fuse and compute, and bertopt's side of running them.

No Ascend device, CANN toolkit, `atc` or `ais_bench` exists where bertopt is built, so every behaviour
of theirs encoded here was read from public sources, cited beside the code or data that encodes it
(the project's notes: ``shared/notes/ascend-facts.md``). Where a behaviour varies by CANN version it is
data keyed by version (``bertopt/data/``), read by the passes, ``check``, the atc command and the
emulation alike, so one table decides.

Modules: ``soc`` (which chip: --soc or npu-smi), ``atc`` (the atc command, running it), ``npu`` (the OM
on a device through ais_bench), ``form`` (the attention form ATC's big kernels match), ``legality``
(what ATC's ONNX parser takes), ``check`` (``bertopt check``: form, legality and fusion per block).
"""
