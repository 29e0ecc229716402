"""The graph layer: ONNX models as onnx-graphsurgeon graphs, and everything passes do with them.

    io        reading and writing, weights left in their file (onnxfile: the wire-format scanner)
    values    a constant's values read without keeping them; the fp16 range
    edit      rewiring uses, adding nodes and constants under unique names
    shapes    the weightless skeleton: shape inference, verification, static shapes
    opset     the ONNX domain, nodes lowered to an older opset, the opset imports
    pattern   the declarative matcher;  rules  pattern + rewrite;  builder  writing subgraphs
    evaluate  running a subgraph on ONNX Runtime (what a constant-folding decision needs)
    golden    name-insensitive text snapshots and structural hashes of a graph

The names passes use most are re-exported here (``from bertopt.graph import load_graph, add_node``).
"""

from bertopt.graph.edit import (GraphSnapshot, add_node, insert_after, is_copy_of, make_constant, nodes_between,
                                producer, put_first, remove_noop_casts, replace_uses, set_inputs, splice_out, toposort,
                                unique_name)
from bertopt.graph.io import (EXTERNAL_DATA_THRESHOLD, FileValues, ModelSource, fits_protobuf, lift_constant_nodes,
                              load_graph, load_model, save_graph, save_model, scan_file, tensor_nbytes, to_model)
from bertopt.graph.shapes import infer_shapes, is_static, reinfer_shapes, skeleton_model, static_dim, verify
from bertopt.graph.values import (FP16_MAX, constant_bytes, constant_exceeds_fp16, constant_value, exceeds_fp16,
                                  peek_values, value_chunks)

__all__ = ["EXTERNAL_DATA_THRESHOLD", "FP16_MAX", "FileValues", "GraphSnapshot", "ModelSource", "add_node",
           "constant_bytes", "constant_exceeds_fp16", "constant_value", "exceeds_fp16", "fits_protobuf",
           "infer_shapes", "insert_after", "is_copy_of", "is_static", "lift_constant_nodes", "load_graph",
           "load_model", "make_constant", "nodes_between", "peek_values", "producer", "put_first", "reinfer_shapes",
           "remove_noop_casts", "replace_uses", "save_graph", "save_model", "scan_file", "set_inputs",
           "skeleton_model", "splice_out", "static_dim", "tensor_nbytes", "to_model", "toposort", "unique_name",
           "value_chunks", "verify"]
