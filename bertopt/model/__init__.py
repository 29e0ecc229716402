"""Model knowledge: what a graph is (ModelFacts), where its parts are (regions), and the forms its
subgraphs take (Gelu spellings, ATC's and ONNX Runtime's Gelu). Built on the graph layer only."""
