"""Validation: realistic feeds, Polygraphy-style comparison (parity), the backends a candidate runs on
(ONNX Runtime, the Ascend emulation, the OM through ais_bench) and the candidates of a run (candidates)."""
