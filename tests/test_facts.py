"""ModelFacts: sizes and input roles detected from the graph's structure, not from names."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper
from user_exports import user_export  # noqa: F401 (a fixture)

from bertopt.errors import BertoptError
from bertopt.graph import load_graph
from bertopt.model.facts import detect_facts

ROLES = {"input_ids": "input_ids", "attention_mask": "attention_mask", "token_type_ids": "token_type_ids"}


@pytest.mark.parametrize("variant", ["legacy14", "legacy17", "sdpa14", "dynamo18", "dynamo20", "dynamo23sdpa"])
def test_tiny_bert_facts_in_every_export(tiny_export, variant):
    facts = detect_facts(load_graph(tiny_export(variant)))
    assert (facts.family, facts.num_layers, facts.hidden, facts.heads, facts.head_dim) == ("bert", 2, 32, 2, 16)
    assert (facts.vocab_size, facts.max_positions, facts.type_vocab_size) == (1000, 128, 2)
    assert facts.roles == ROLES
    assert not facts.is_static


def test_other_sizes_come_from_the_graph(tiny_export):
    path = tiny_export("legacy14", hidden_size=48, num_attention_heads=3, intermediate_size=96,
                       num_hidden_layers=3)
    facts = detect_facts(load_graph(path))
    assert (facts.num_layers, facts.hidden, facts.heads, facts.head_dim) == (3, 48, 3, 16)


def test_roles_are_found_by_use_not_by_name(tiny_export):
    model = onnx.load(str(tiny_export("legacy14")))
    renames = {"input_ids": "a", "attention_mask": "b", "token_type_ids": "c"}
    for value in model.graph.input:
        value.name = renames[value.name]
    for node in model.graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
    model.graph.input.reverse()
    facts = detect_facts(load_graph(model))
    assert facts.roles == {"a": "input_ids", "b": "attention_mask", "c": "token_type_ids"}


def test_two_input_model_has_no_token_types(tiny_export):
    path = tiny_export("legacy14", type_vocab_size=1)
    facts = detect_facts(load_graph(path))
    assert facts.input_for("token_type_ids") is None
    assert set(facts.roles.values()) == {"input_ids", "attention_mask"}


def small_cnn() -> onnx.ModelProto:
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], np.ones(108, np.float32))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


def test_a_cnn_without_attention_is_not_a_transformer():
    with pytest.raises(BertoptError, match="not a transformer bertopt knows"):
        detect_facts(load_graph(small_cnn()))


def test_embeddings_without_attention_are_refused():
    ids = gs.Variable("ids", dtype=np.int64, shape=["b", "s"])
    out = gs.Variable("out", dtype=np.float32)
    table = gs.Constant("table", np.ones((50, 8), np.float32))
    graph = gs.Graph(nodes=[gs.Node("Gather", inputs=[table, ids], outputs=[out])], inputs=[ids], outputs=[out],
                     opset=14)
    with pytest.raises(BertoptError, match="no attention"):
        detect_facts(graph)


@pytest.mark.parametrize("preset, roles, positions", [
    ("roberta-tiny", {"input_ids", "attention_mask"}, 128),  # 130 rows: positions start at padding_idx + 1
    ("distilbert-tiny", {"input_ids", "attention_mask"}, 128),
    ("albert-tiny", {"input_ids", "attention_mask", "token_type_ids"}, 128),
])
@pytest.mark.parametrize("variant", ["legacy14", "dynamo18"])
def test_other_families(tiny_export, preset, roles, positions, variant):
    facts = detect_facts(load_graph(tiny_export(variant, preset=preset)))
    assert (facts.num_layers, facts.hidden, facts.heads, facts.head_dim, facts.vocab_size) == (2, 32, 2, 16, 1000)
    assert set(facts.roles.values()) == roles
    assert facts.max_positions == positions


@pytest.mark.parametrize("mask, kind, roles", [
    ("int", "binary", ROLES),
    ("float", "binary", ROLES),
    ("additive", "additive", ROLES),
    ("none", None, {"input_ids": "input_ids", "token_type_ids": "token_type_ids"}),
])
@pytest.mark.parametrize("variant", ["legacy14", "dynamo18"])
def test_mask_kinds(user_export, variant, mask, kind, roles):
    facts = detect_facts(load_graph(user_export(variant=variant, mask=mask)))
    assert (facts.mask_kind, facts.roles, facts.attention) == (kind, roles, "bidirectional")


@pytest.mark.parametrize("variant", ["legacy14", "dynamo18"])
def test_fp16_export_facts(user_export, variant):
    facts = detect_facts(load_graph(user_export(variant=variant, dtype="fp16")))
    assert (facts.num_layers, facts.hidden, facts.heads, facts.head_dim, facts.roles) == (2, 32, 2, 16, ROLES)


def test_ids_through_a_slice_are_found():
    """XLM slices the ids to the last `seq` columns (for its cache) before looking them up."""
    ids = gs.Variable("ids", dtype=np.int64, shape=["b", "s"])
    sliced, out = gs.Variable("sliced", dtype=np.int64), gs.Variable("out", dtype=np.float32)
    starts, ends = gs.Constant("starts", np.array([0])), gs.Constant("ends", np.array([1 << 62]))
    table = gs.Constant("table", np.ones((50, 8), np.float32))
    nodes = [gs.Node("Slice", inputs=[ids, starts, ends, gs.Constant("axes", np.array([1]))], outputs=[sliced]),
             gs.Node("Gather", inputs=[table, sliced], outputs=[out])]
    graph = gs.Graph(nodes=nodes, inputs=[ids], outputs=[out], opset=14)
    with pytest.raises(BertoptError, match="no attention Softmax"):  # past the lookup: the ids were found
        detect_facts(graph)


def test_a_gpt2_decoder_is_causal(user_export):
    facts = detect_facts(load_graph(user_export("gpt2")))
    assert (facts.family, facts.attention, facts.hidden, facts.heads, facts.head_dim) == ("gpt2", "causal", 32, 2, 16)
