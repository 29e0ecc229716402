"""SQuAD v1.1 accuracy: the seed's proof that an optimized model still answers questions.

data (load the questions) -> prep (features in ais_bench's layout) -> infer (logits from ONNX Runtime
or an ais_bench results folder) -> post (logits -> answer text) -> metric (the official EM/F1);
check runs the original and the optimized graph (and the Ascend emulation) on the same features.
"""
