"""Backends: ORT candidates and the OM backend (its refusal without ais_bench, feeds checked against the
OM's inputs, outputs bound by position, its session's lifetime).

The OM backend is exercised through tests/ais_bench_double.py, a double of ais_bench's InferSession over
an ONNX graph: it tests bertopt's side of ais_bench, and no test says an OM ran.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from ais_bench_double import InferSession2022, InferSessionAit, om_output_names, session_factory
from onnx import TensorProto
from test_parity import qa_facts, qa_model

from bertopt.errors import BertoptError
from bertopt.validation.backends import Skipped
from bertopt.validation.backends.npu import AisBenchBackend, bind_outputs, om_backend, onnx_output_name
from bertopt.validation.backends.ort import OrtBackend, ort_backends
from bertopt.validation.parity import OrtRunner, realistic_feeds

BATCH, SEQ = 2, 8
SHAPES = {"input_ids": (BATCH, SEQ), "attention_mask": (BATCH, SEQ), "token_type_ids": (BATCH, SEQ)}
REFERENCE_OUTPUTS = ["start_logits", "end_logits"]


# --------------------------------------------------------------------------- ORT and the OM

def test_ort_backend_casts_feeds_to_the_declared_inputs():
    backend = OrtBackend(qa_model(int_type=TensorProto.INT32), name="int32 ids")
    [feed] = realistic_feeds(qa_facts(), batch=2, seq=8)
    outputs = backend.run(feed)
    assert set(outputs) == {"start_logits", "end_logits"} and outputs["start_logits"].shape == (2, 8)
    assert backend.kind == "onnx"


def test_ort_backends_include_the_cpu():
    names = [b.name for b in ort_backends(qa_model(), "optimized")]
    assert names[0] == "optimized (ORT CPU)"
    assert all("CUDA" in name for name in names[1:])


def test_om_backend_is_skipped_without_an_om_or_ais_bench(tmp_path):
    assert om_backend(None).reason.startswith("no compiled OM")
    om = tmp_path / "model.om"
    om.write_bytes(b"not really an OM")
    skipped = om_backend(om)
    assert isinstance(skipped, Skipped) and skipped.kind == "npu"
    assert "ais_bench is not installed" in skipped.reason


# --------------------------------------------------------------------------- the OM, through the double

@pytest.fixture
def qa_path(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(qa_model(), path)
    return path


def feed() -> dict[str, np.ndarray]:
    [one] = realistic_feeds(qa_facts(), batch=BATCH, seq=SEQ)
    return one


def om(path, generation=InferSessionAit, *, input_dtypes=None, opened=None, output_names=REFERENCE_OUTPUTS):
    factory = session_factory(generation, shapes=SHAPES, input_dtypes=input_dtypes, opened=opened)
    return AisBenchBackend(path, 0, factory, output_names)


def test_om_output_names_carry_the_onnx_name_last(qa_path):
    names = om_output_names(onnx.load(qa_path))
    assert [name.split(":")[1:] for name in names] == [["0", "start_logits"], ["0", "end_logits"]]
    assert len({name.split(":")[0] for name in names}) == 2, "two producer ops"
    assert onnx_output_name("/Cast:0:start_logits") == "start_logits" and onnx_output_name("logits") == "logits"


@pytest.mark.parametrize("generation, released_by", [(InferSession2022, "finalized"), (InferSessionAit, "freed")])
def test_outputs_are_bound_by_position_and_the_session_released_by_what_exists(qa_path, generation, released_by):
    opened = []
    backend = om(qa_path, generation, opened=opened)
    assert opened == [], "the OM is loaded on the first run, not before"
    sample = feed()
    outputs = backend.run(sample)
    backend.run(sample)
    assert list(outputs) == REFERENCE_OUTPUTS
    expected = OrtRunner(qa_path).run(sample)
    for name in REFERENCE_OUTPUTS:
        np.testing.assert_array_equal(outputs[name], expected[name])
    assert len(opened) == 1 and opened[0].calls == 2
    backend.close()
    assert getattr(opened[0], released_by)
    if generation is InferSessionAit:
        assert not opened[0].finalized, "ait's finalize ends aclruntime for the process: free_resource releases"
    backend.close()


def test_positions_decide_names_that_do_not_match(qa_path):
    """The reference's outputs may be named otherwise (a renamed graph output): position 0 is position 0."""
    outputs = om(qa_path, output_names=["start", "end"]).run(feed())
    assert list(outputs) == ["start", "end"]


def test_a_swapped_output_order_is_refused():
    values = [np.zeros(1), np.ones(1)]
    with pytest.raises(BertoptError, match=r"OM output 0 is /Squeeze_1:0:end_logits but the reference's output 0 "
                                           r"is start_logits"):
        bind_outputs(["/Squeeze_1:0:end_logits", "/Squeeze:0:start_logits"], values, REFERENCE_OUTPUTS)
    with pytest.raises(BertoptError, match=r"the OM has 1 output\(s\) .*the reference has 2"):
        bind_outputs(["/Squeeze:0:start_logits"], values[:1], REFERENCE_OUTPUTS)
    assert list(bind_outputs(["/a:0:start_logits", "/b:0:end_logits"], values, None)) == REFERENCE_OUTPUTS


def test_int64_feeds_are_cast_to_an_int32_om_when_they_fit(qa_path):
    opened = []
    backend = om(qa_path, input_dtypes={name: np.int32 for name in SHAPES}, opened=opened)
    sample = feed()
    assert all(value.dtype == np.int64 for value in sample.values())
    outputs = backend.run(sample)
    np.testing.assert_array_equal(outputs["end_logits"], OrtRunner(qa_path).run(sample)["end_logits"])
    sample["input_ids"] = sample["input_ids"].copy()
    sample["input_ids"][0, 0] = 2**40
    with pytest.raises(BertoptError, match=r"^feed input_ids holds values outside int32 \(.*1099511627776\)"):
        backend.run(sample)


def test_a_wrong_dtype_is_caught_before_ais_bench_reads_its_bytes(qa_path):
    """The double, like ais_bench, checks byte sizes only: a float32 mask in an int32 input has the right
    size and is read as integers without complaint, giving wrong logits. bertopt refuses it first."""
    int32 = {name: np.int32 for name in SHAPES}
    right = {name: value.astype(np.int32) for name, value in feed().items()}
    wrong = dict(right, attention_mask=right["attention_mask"].astype(np.float32))
    session = InferSessionAit(0, str(qa_path), shapes=SHAPES, input_dtypes=int32)
    truth, garbage = (session.infer([sample[name] for name in SHAPES]) for sample in (right, wrong))
    assert not np.allclose(truth[0], garbage[0])
    with pytest.raises(BertoptError, match=r"^feed attention_mask is float32; the OM input is int32 "
                                           r"\(ais_bench copies raw bytes, so bertopt casts only integers that fit\)$"):
        om(qa_path, input_dtypes=int32).run(wrong)


def test_the_double_refuses_a_buffer_of_the_wrong_size_as_ais_bench_does(qa_path):
    session = InferSession2022(0, str(qa_path), shapes=SHAPES, input_dtypes={name: np.int32 for name in SHAPES})
    with pytest.raises(RuntimeError, match="in size:128 needsize:64 not match"):
        session.infer([feed()[name] for name in SHAPES], mode="static")


def test_a_feed_of_another_shape_or_a_missing_feed_is_refused(qa_path):
    backend = om(qa_path)
    [longer] = realistic_feeds(qa_facts(), batch=BATCH, seq=SEQ * 2)
    with pytest.raises(BertoptError, match=r"^feed input_ids has shape \[2, 16\]; the OM input takes \[2, 8\]$"):
        backend.run(longer)
    sample = feed()
    del sample["token_type_ids"]
    with pytest.raises(BertoptError, match="the OM has input token_type_ids the reference does not feed"):
        backend.run(sample)
    backend.close()


def test_a_dynamic_om_input_is_refused(qa_path):
    factory = session_factory(InferSessionAit, shapes={**SHAPES, "input_ids": (-1, SEQ)})
    with pytest.raises(BertoptError, match=r"input_ids has dynamic shape \[-1, 8\]; bertopt runs static OMs"):
        AisBenchBackend(qa_path, 0, factory, REFERENCE_OUTPUTS).run(feed())


def test_a_failed_execution_is_a_bertopt_error(qa_path):
    class Failing(InferSessionAit):
        def infer(self, feeds, mode="static", custom_sizes=100000):
            raise RuntimeError("acl execute failed:507011\nstack")

    factory = session_factory(Failing, shapes=SHAPES)
    with pytest.raises(BertoptError, match=r"ais_bench failed to run .*model.onnx on device 0: acl execute failed:507011$"):
        AisBenchBackend(qa_path, 0, factory, REFERENCE_OUTPUTS).run(feed())


def test_an_om_that_cannot_load_is_a_bertopt_error(tmp_path):
    def refuse(device_id: int, path: str):
        raise RuntimeError("aclmdlLoadFromFile failed\nstack trace")

    with pytest.raises(BertoptError, match=r"ais_bench cannot load .*model.om on device 3: aclmdlLoadFromFile failed$"):
        AisBenchBackend(tmp_path / "model.om", 3, refuse).run(feed())
