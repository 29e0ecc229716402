"""bertopt: a graph-surgery compiler frontend for BERT-family ONNX models."""

__version__ = "0.1.0"
