"""Realistic feeds, the ORT runner, the Polygraphy-style comparator and the whole parity check."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bertopt.errors import BertoptError
from bertopt.model.facts import ModelFacts
from bertopt.validation.parity import (DEFAULT_ATOL, FP16_ATOL, REL_EPSILON, OrtRunner, best_spans, compare_outputs,
                                       dtype_tolerances, input_specs_of, kept_tokens, parity_check, realistic_feeds,
                                       span_agreement)

VOCAB, HIDDEN = 200, 8
ROLES = {"input_ids": "input_ids", "attention_mask": "attention_mask",
         "token_type_ids": "token_type_ids"}


def qa_facts(**overrides) -> ModelFacts:
    values = dict(family="bert", num_layers=0, hidden=HIDDEN, heads=1, head_dim=HIDDEN,
                  vocab_size=VOCAB, max_positions=None, type_vocab_size=2, roles=ROLES)
    values.update(overrides)
    return ModelFacts(**values)


def qa_model(*, head_shift: float = 0.0, int_type=TensorProto.INT64) -> onnx.ModelProto:
    """Embeddings, mask and a QA head: start/end logits [batch, seq] that depend on every input.

    `head_shift` perturbs the end-logit column of the head; int32 inputs are cast to int64 inside.
    """
    rng = np.random.default_rng(7)
    head = rng.normal(size=(HIDDEN, 2)).astype(np.float32)
    head[:, 1] += head_shift
    inits = [
        numpy_helper.from_array(rng.normal(size=(VOCAB, HIDDEN)).astype(np.float32), "word"),
        numpy_helper.from_array(rng.normal(size=(2, HIDDEN)).astype(np.float32), "segment"),
        numpy_helper.from_array(head, "head"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "last_axis"),
        numpy_helper.from_array(np.array([1, 1], dtype=np.int64), "halves"),
    ]
    names = list(ROLES)
    nodes = []
    if int_type != TensorProto.INT64:
        nodes += [helper.make_node("Cast", [n], [f"{n}_64"], to=TensorProto.INT64) for n in names]
        names = [f"{n}_64" for n in names]
    ids, mask, types = names
    nodes += [
        helper.make_node("Gather", ["word", ids], ["tok"]),
        helper.make_node("Gather", ["segment", types], ["seg"]),
        helper.make_node("Add", ["tok", "seg"], ["emb"]),
        helper.make_node("Cast", [mask], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "last_axis"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
        helper.make_node("MatMul", ["masked", "head"], ["logits"]),
        helper.make_node("Split", ["logits", "halves"], ["s3", "e3"], axis=-1),
        helper.make_node("Squeeze", ["s3", "last_axis"], ["start_logits"]),
        helper.make_node("Squeeze", ["e3", "last_axis"], ["end_logits"]),
    ]
    inputs = [helper.make_tensor_value_info(n, int_type, ["batch", "seq"]) for n in ROLES]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "seq"])
               for n in ("start_logits", "end_logits")]
    graph = helper.make_graph(nodes, "tiny_qa", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


# --------------------------------------------------------------------------- input specs, feeds

def test_input_specs_of_reads_dtypes_and_dims_and_skips_initializers():
    model = qa_model(int_type=TensorProto.INT32)
    model.graph.input[1].type.tensor_type.elem_type = TensorProto.BOOL
    model.graph.input[1].type.tensor_type.shape.dim[0].dim_value = 4
    model.graph.input.append(helper.make_tensor_value_info("head", TensorProto.FLOAT, [HIDDEN, 2]))
    specs = input_specs_of(model)
    assert list(specs) == list(ROLES)
    assert specs["input_ids"] == (np.dtype(np.int32), ("batch", "seq"))
    assert specs["attention_mask"] == (np.dtype(bool), (4, "seq"))


def test_feeds_look_like_padded_token_pairs():
    [feed] = realistic_feeds(qa_facts(), batch=16, seq=24, seed=3)
    ids, mask, types = feed["input_ids"], feed["attention_mask"], feed["token_type_ids"]
    assert all(a.dtype == np.int64 and a.shape == (16, 24) for a in (ids, mask, types))
    lengths = mask.sum(axis=1)
    assert lengths.min() >= 1 and lengths.max() == 24 and lengths.min() < 24
    assert len(set(lengths.tolist())) > 2, "valid lengths should vary"
    for row, length in enumerate(lengths):
        assert (mask[row, :length] == 1).all() and (mask[row, length:] == 0).all()
        assert (ids[row, length:] == 0).all() and (types[row, length:] == 0).all()
        assert ids[row, 0] == 101
        if length >= 2:
            assert ids[row, length - 1] == 102
        segment = types[row, :length]
        assert segment[0] == 0 and (np.diff(segment) >= 0).all(), "types must be 0s then 1s"
    assert ids.min() >= 0 and ids.max() < VOCAB
    assert (types == 1).any()
    ordinary = ids[(mask == 1) & (ids != 101) & (ids != 102)]
    assert ordinary.min() >= 4 and len(np.unique(ordinary)) > 50


def test_feeds_follow_the_model_dtypes():
    model = qa_model(int_type=TensorProto.INT32)
    model.graph.input[1].type.tensor_type.elem_type = TensorProto.BOOL
    [feed] = realistic_feeds(qa_facts(), input_specs_of(model), batch=3, seq=10)
    assert feed["input_ids"].dtype == np.int32 and feed["token_type_ids"].dtype == np.int32
    assert feed["attention_mask"].dtype == np.bool_
    assert feed["attention_mask"].all(axis=1).any() and not feed["attention_mask"].all()


def test_small_vocabulary_uses_low_special_ids_and_single_type_models_get_zeros():
    facts = qa_facts(vocab_size=50, type_vocab_size=1)
    [feed] = realistic_feeds(facts, batch=4, seq=12, seed=1)
    assert (feed["input_ids"][:, 0] == 2).all()
    assert feed["input_ids"].max() < 50
    assert not feed["token_type_ids"].any()


def test_feeds_are_deterministic_per_seed_and_samples_differ():
    first = realistic_feeds(qa_facts(), batch=4, seq=16, seed=5, count=2)
    again = realistic_feeds(qa_facts(), batch=4, seq=16, seed=5, count=2)
    other = realistic_feeds(qa_facts(), batch=4, seq=16, seed=6, count=2)
    for name in ROLES:
        assert all(np.array_equal(a[name], b[name]) for a, b in zip(first, again))
    assert not np.array_equal(first[0]["input_ids"], other[0]["input_ids"])
    assert not np.array_equal(first[0]["input_ids"], first[1]["input_ids"])


def test_every_batch_has_a_full_and_a_padded_row():
    feeds = realistic_feeds(qa_facts(), batch=2, seq=3, count=30)
    for feed in feeds:
        lengths = feed["attention_mask"].sum(axis=1)
        assert lengths.max() == 3 and lengths.min() < 3


def test_single_row_batch_is_valid():
    [feed] = realistic_feeds(qa_facts(), batch=1, seq=1)
    assert feed["input_ids"].tolist() == [[101]] and feed["attention_mask"].tolist() == [[1]]


def test_inputs_without_a_role_are_named():
    specs = input_specs_of(qa_model())
    specs["position_ids"] = (np.dtype(np.int64), ("batch", "seq"))
    with pytest.raises(BertoptError, match="position_ids"):
        realistic_feeds(qa_facts(), specs, batch=2, seq=8)


def test_static_dims_must_match_the_requested_shape():
    specs = {name: (np.dtype(np.int64), (1, 384)) for name in ROLES}
    assert realistic_feeds(qa_facts(), specs, batch=1, seq=384)
    with pytest.raises(BertoptError, match=r"\(1, 384\)"):
        realistic_feeds(qa_facts(), specs, batch=2, seq=384)


# --------------------------------------------------------------------------- comparator

def one(name: str, values) -> list[dict[str, np.ndarray]]:
    return [{name: np.asarray(values, dtype=np.float32)}]


def test_identical_outputs_pass_with_zero_difference():
    ref = one("y", [[1.0, -2.0, 0.0]])
    result = compare_outputs(ref, ref)
    [stats] = result.outputs
    assert result.passed and stats.passed
    assert stats.max_abs == 0 and stats.max_rel == 0
    assert stats.min_atol_to_pass == 0 and stats.min_rtol_to_pass == 0


def test_element_fails_only_when_both_tolerances_are_exceeded():
    ref = one("y", [100.0])
    # abs 0.5 > atol, rel 0.005 > rtol: fails
    assert not compare_outputs(ref, one("y", [100.5]), atol=1e-3, rtol=1e-3).passed
    # abs 0.5 > atol but rel 0.005 <= rtol 0.01: passes
    assert compare_outputs(ref, one("y", [100.5]), atol=1e-3, rtol=1e-2).passed
    # rel 0.005 > rtol but abs 0.5 <= atol 1: passes
    assert compare_outputs(ref, one("y", [100.5]), atol=1.0, rtol=1e-3).passed


def test_zero_reference_uses_epsilon_for_the_relative_difference():
    [stats] = compare_outputs(one("y", [0.0]), one("y", [1e-6]), atol=1e-7).outputs
    assert not stats.passed
    assert stats.max_rel == pytest.approx(1e-6 / REL_EPSILON, rel=1e-6)


@pytest.mark.parametrize("ref, cand", [([1.0, 2.0], [1.0, np.nan]), ([np.nan], [np.nan]),
                                       ([np.inf], [np.inf]), ([1.0], [-np.inf])])
def test_nan_and_inf_fail_at_any_tolerance(ref, cand):
    [stats] = compare_outputs(one("y", ref), one("y", cand), atol=1e9, rtol=1e9).outputs
    assert not stats.passed
    assert stats.nan_or_inf == np.count_nonzero(~np.isfinite(cand))
    assert stats.min_atol_to_pass == math.inf or stats.min_rtol_to_pass == math.inf
    assert "no tolerance passes" in compare_outputs(one("y", ref), one("y", cand)).summary_line()


def test_tolerances_per_output_with_a_default():
    ref = [{"a": np.float32([1.0]), "b": np.float32([1.0])}]
    cand = [{"a": np.float32([1.1]), "b": np.float32([1.1])}]
    result = compare_outputs(ref, cand, atol={"a": 0.2, "": 1e-3}, rtol=1e-3)
    assert [(o.name, o.passed, o.atol) for o in result.outputs] == [("a", True, 0.2),
                                                                  ("b", False, 1e-3)]
    assert not result.passed
    with pytest.raises(BertoptError, match="'c'"):
        compare_outputs(ref, cand, atol={"c": 1.0})
    with pytest.raises(BertoptError, match="rtol"):
        compare_outputs(ref, cand, rtol=-1.0)


def test_smallest_passing_tolerances_are_exact():
    ref = one("y", [1.0, 1000.0, 0.0])
    cand = one("y", [1.01, 1000.5, 1e-5])
    [stats] = compare_outputs(ref, cand, atol=1e-4, rtol=1e-3).outputs
    # rel > 1e-3 at elements 0 and 2, so atol must cover their abs diffs (0.01, 1e-5), not 0.5;
    # abs > 1e-4 at elements 0 and 1, so rtol must cover 0.01 and 5e-4, not the huge 1e-5/eps.
    assert stats.min_atol_to_pass == pytest.approx(0.01, rel=1e-4)
    assert stats.min_rtol_to_pass == pytest.approx(0.01, rel=1e-4)
    assert stats.max_abs == pytest.approx(0.5) and stats.max_rel > 1e9
    assert compare_outputs(ref, cand, atol=stats.min_atol_to_pass, rtol=1e-3).passed
    assert not compare_outputs(ref, cand, atol=stats.min_atol_to_pass * 0.99, rtol=1e-3).passed
    assert compare_outputs(ref, cand, atol=1e-4, rtol=stats.min_rtol_to_pass).passed
    assert not compare_outputs(ref, cand, atol=1e-4, rtol=stats.min_rtol_to_pass * 0.99).passed


def test_statistics_cover_all_samples():
    ref = [{"y": np.zeros(100, np.float32) + 1}, {"y": np.zeros(100, np.float32) + 1}]
    cand = [{"y": np.ones(100, np.float32)}, {"y": np.ones(100, np.float32)}]
    cand[0]["y"][0] = 2.0
    cand[1]["y"][5:7] = 3.0
    [stats] = compare_outputs(ref, cand).outputs
    # Sorted abs diffs end in 1, 2, 2 at positions 197..199: p99 sits at 197.01.
    assert stats.max_abs == 2.0 and stats.mean_abs == pytest.approx(5.0 / 200)
    assert stats.median_abs == 0.0 and stats.p99_abs == pytest.approx(1.01)
    assert not stats.passed


def test_missing_extra_and_reshaped_outputs_fail_with_a_reason():
    ref = [{"a": np.zeros((2, 3)), "b": np.zeros(2)}]
    cand = [{"a": np.zeros((3, 2)), "c": np.zeros(2)}]
    result = compare_outputs(ref, cand)
    reasons = {o.name: o.reason for o in result.outputs}
    assert not result.passed and not any(o.passed for o in result.outputs)
    assert "(3, 2)" in reasons["a"] and "missing from the candidate" in reasons["b"]
    assert "not in the reference" in reasons["c"]
    assert "b FAILED: missing" in result.summary_line()
    json.dumps(result.to_dict(), allow_nan=False)


def test_unusable_arguments_raise():
    with pytest.raises(BertoptError, match="number of reference and candidate samples"):
        compare_outputs(one("y", [1.0]) * 2, one("y", [1.0]))
    with pytest.raises(BertoptError):
        compare_outputs([], [])


# --------------------------------------------------------------------------- answer spans

def test_best_span_keeps_end_after_start_and_inside_the_mask():
    start = np.array([[0.0, 6.0, 0.0, 9.0], [1.0, 3.0, 0.0, 0.0]])
    end = np.array([[0.0, 0.0, 5.0, 1.0], [0.0, 0.0, 2.0, 9.0]])
    # row 0: argmax start 3 comes after argmax end 2; the best legal span is (1, 2) at 11.
    # row 1: (1, 3) at 12 wins until the mask hides position 3, then (1, 2) at 5.
    assert best_spans(start, end).tolist() == [[1, 2], [1, 3]]
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]])
    assert best_spans(start, end, mask).tolist() == [[1, 2], [1, 2]]


def test_span_agreement_counts_rows_over_samples():
    start = np.array([[0.0, 5.0, 0.0], [4.0, 0.0, 0.0]], dtype=np.float32)
    end = np.array([[0.0, 0.0, 5.0], [0.0, 4.0, 0.0]], dtype=np.float32)
    ref = [{"start_logits": start, "end_logits": end}] * 2
    moved = end.copy()
    moved[1] = [0.0, 0.0, 6.0]
    cand = [{"start_logits": start, "end_logits": end}, {"start_logits": start, "end_logits": moved}]
    assert span_agreement(ref, cand) == pytest.approx(3 / 4)
    result = compare_outputs(ref, cand, rtol=0.0)
    assert result.span_agreement == pytest.approx(3 / 4) and not result.passed
    assert "75.0%" in result.summary_line()


def test_span_agreement_is_none_without_qa_logits_and_nan_never_agrees():
    assert span_agreement(one("y", [[1.0]]), one("y", [[1.0]])) is None
    start = np.array([[1.0, 0.0]])
    ref = [{"start_logits": start, "end_logits": start}]
    cand = [{"start_logits": np.array([[np.nan, 0.0]]), "end_logits": start}]
    assert span_agreement(ref, cand) == 0.0
    assert span_agreement(ref, ref) == 1.0


# --------------------------------------------------------------------------- ORT and parity

def test_runner_from_path_or_proto_gives_the_same_outputs(tmp_path):
    model = qa_model()
    path = tmp_path / "qa.onnx"
    onnx.save(model, str(path))
    [feed] = realistic_feeds(qa_facts(), batch=2, seq=6)
    from_proto = OrtRunner(model, threads=1)
    from_path = OrtRunner(path)
    assert from_proto.input_names == list(ROLES)
    assert from_proto.output_names == ["start_logits", "end_logits"]
    a, b = from_proto.run(feed), from_path.run(feed)
    assert a["start_logits"].shape == (2, 6)
    assert np.array_equal(a["end_logits"], b["end_logits"])


def test_runner_reports_bad_feeds_and_paths(tmp_path):
    runner = OrtRunner(qa_model())
    with pytest.raises(BertoptError, match="token_type_ids"):
        runner.run({"input_ids": np.zeros((1, 2), np.int64),
                    "attention_mask": np.ones((1, 2), np.int64)})
    with pytest.raises(BertoptError, match="no such file"):
        OrtRunner(tmp_path / "absent.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(BertoptError, match="ONNX Runtime cannot load"):
        OrtRunner(tmp_path / "junk.onnx")


def test_parity_of_a_model_with_itself_is_exact(tmp_path):
    path = tmp_path / "qa.onnx"
    onnx.save(qa_model(), str(path))
    result = parity_check(path, qa_model(), qa_facts(), batch=3, seq=16, samples=2)
    assert result.passed and result.samples == 2
    assert all(o.max_abs == 0.0 and o.nan_or_inf == 0 for o in result.outputs)
    assert result.span_agreement == 1.0
    assert result.summary_line().startswith("PASSED")


def test_parity_catches_a_perturbed_output_and_names_it():
    result = parity_check(qa_model(), qa_model(head_shift=0.05), qa_facts(), batch=3, seq=16)
    stats = {o.name: o for o in result.outputs}
    assert not result.passed
    assert stats["start_logits"].passed and not stats["end_logits"].passed
    assert stats["end_logits"].min_atol_to_pass > 1e-4
    assert "end_logits FAILED" in result.summary_line()
    assert "start_logits FAILED" not in result.summary_line()


def test_parity_feeds_a_rewrite_with_narrower_input_types():
    result = parity_check(qa_model(), qa_model(int_type=TensorProto.INT32), qa_facts(),
                          batch=2, seq=8)
    assert result.passed and all(o.max_abs == 0.0 for o in result.outputs)


# --------------------------------------------------------------------------- mask kinds and dtypes

def test_additive_mask_feeds_hold_zero_and_the_dtypes_minimum():
    facts = qa_facts(mask_kind="additive")
    specs = {"input_ids": (np.dtype(np.int64), (4, 12)), "attention_mask": (np.dtype(np.float16), (4, 12)),
             "token_type_ids": (np.dtype(np.int64), (4, 12))}
    [feed] = realistic_feeds(facts, specs, batch=4, seq=12, seed=2)
    [binary] = realistic_feeds(qa_facts(), specs, batch=4, seq=12, seed=2)
    mask = feed["attention_mask"]
    assert mask.dtype == np.float16 and set(np.unique(mask).tolist()) == {0.0, -65504.0}
    assert np.array_equal(mask == 0, binary["attention_mask"] == 1)
    assert np.array_equal(kept_tokens(facts, feed), kept_tokens(qa_facts(), binary))
    assert kept_tokens(qa_facts(roles={"input_ids": "input_ids"}), {"input_ids": feed["input_ids"]}) is None


def _with_weights_of(model: onnx.ModelProto, dtype: int) -> onnx.ModelProto:
    """The model with its largest initializer (the word table) stored as `dtype`; only the header counts."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    word = next(t for t in model.graph.initializer if t.name == "word")
    values = numpy_helper.to_array(word).astype(helper.tensor_dtype_to_np_dtype(dtype))
    word.CopyFrom(numpy_helper.from_array(values, "word"))
    return model


def test_tolerances_follow_the_weights_dtype():
    assert dtype_tolerances(qa_model()) == (DEFAULT_ATOL, DEFAULT_ATOL)
    assert dtype_tolerances(_with_weights_of(qa_model(), TensorProto.FLOAT16)) == (FP16_ATOL, FP16_ATOL)
    assert FP16_ATOL == 2.0 ** -7
