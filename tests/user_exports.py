"""Exports users bring (issue 12): tiny models of other families, fp16 weights, other mask inputs.

`user_export(family="bert", variant="legacy14", **export_options)` -> Path of a dynamic export, made
through bertopt's exporter and its content cache like conftest's `tiny_export`. Families other than
"bert" (bert-tiny) are built from transformers' configs with random weights at tiny sizes. Import
the fixture into a test module with ``from user_exports import user_export``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import VARIANTS

EXPORT_VARIANTS = {**VARIANTS, "dynamo18sdpa": ("dynamo", 18, "sdpa")}

_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=1000,
             max_position_embeddings=128)
_XLM = dict(emb_dim=32, n_layers=2, n_heads=2, vocab_size=1000, max_position_embeddings=128)

# Config overrides of each family's transformers config: 2 layers, width 32, vocab 1000, and the
# special token ids inside that vocabulary. DeBERTa-v2 as DeBERTa-v3 ships it (relative attention, p2c
# and c2p), since its config class defaults to plain absolute-position attention.
FAMILIES = {
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, n_positions=128, vocab_size=1000, bos_token_id=2, eos_token_id=3),
    "xlm": _XLM,
    "ibert": _TINY,  # quant_mode off (its default): float LayerNorm and Softmax spelt out, reduced over axis 2
    "flaubert": _XLM,
    "deberta-v2": dict(_TINY, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=16,
                       max_relative_positions=-1, position_biased_input=False, norm_rel_ebd="layer_norm",
                       share_att_key=True),
    "funnel": dict(d_model=32, n_head=2, d_head=16, d_inner=64, block_sizes=[1, 1], vocab_size=1000),
    "convbert": dict(_TINY, embedding_size=32),
    "squeezebert": dict(_TINY, embedding_size=32),
    "modernbert": dict(_TINY, global_attn_every_n_layers=1, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                       cls_token_id=2, sep_token_id=3),
}


@pytest.fixture(scope="session")
def user_export(tmp_path_factory):
    from bertopt.flow.export import export_onnx, random_source, resolve_source

    folder = tmp_path_factory.mktemp("user-exports")
    made: dict[tuple, Path] = {}

    def export(family: str = "bert", variant: str = "legacy14", **options) -> Path:
        key = (family, variant, tuple(sorted(options.items())))
        if key not in made:
            exporter, opset, attention = EXPORT_VARIANTS[variant]
            source = resolve_source("bert-tiny") if family == "bert" else random_source(family, FAMILIES[family])
            made[key] = export_onnx(source, folder / f"{family}-{variant}-{len(made)}.onnx", exporter=exporter,
                                    opset=opset, attention=attention, **options).path
        return made[key]

    return export
