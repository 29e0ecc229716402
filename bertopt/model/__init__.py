"""Model knowledge: what a graph is (ModelFacts), where its parts are (regions, the encoder's token-wise
span), and the forms its subgraphs take (Gelu spellings, ATC's and ONNX Runtime's Gelu, LayerNorm, attention).
Built on the graph layer only."""
