"""The quantized weights of a model, attached to its HF modules before our forward fuses them.

`attach_gguf` reads a GGUF file's linear weights (and the token embedding) in their own blocks
(quantized.py) and hangs each on its module as `QUANTIZED`; `attach_int8` quantizes a dense model's
linears at load (`--quantization int8`). The forwards pick them up when they fuse projections
(llama._linear); a module without one stays dense.

GGUF stores a Llama's q and k rows permuted for its own rope: transformers' tensor processor undoes that
on the de-quantized weights, and the very same processor, run on the row numbers, gives the order in which
the blocks' rows are taken, so the blocks always match the weights transformers loads.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tokenwire.engine.models.quantized import SUPPORTED_GGUF_TYPES, QuantizedWeight, from_gguf, quantize_int8

log = logging.getLogger(__name__)

QUANTIZED = "tokenwire_quantized"


def quantized_of(module: torch.nn.Module) -> QuantizedWeight | None:
    return getattr(module, QUANTIZED, None)


def attach_gguf(hf_model: torch.nn.Module, path: Path) -> dict[str, int]:
    """Attach the file's block weights to `hf_model`'s modules; returns the count of tensors per GGUF type
    kept in blocks (types outside SUPPORTED_GGUF_TYPES are left de-quantized, with one log line)."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        read_field,
    )

    reader = GGUFReader(path)
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=hf_model.config.to_dict())
    names = get_gguf_hf_weights_map(hf_model, processor)
    kept: dict[str, int] = {}
    dequantized: dict[str, int] = {}
    for tensor in reader.tensors:
        module = _module_for(hf_model, names.get(tensor.name))
        if module is None or len(tensor.shape) != 2:
            continue
        kind = tensor.tensor_type.name
        if kind not in SUPPORTED_GGUF_TYPES:
            if kind not in ("F32", "F16", "BF16"):
                dequantized[kind] = dequantized.get(kind, 0) + 1
            continue
        shape = (int(tensor.shape[1]), int(tensor.shape[0]))  # GGUF lists [K, N]
        order = _row_order(processor, tensor.name, shape[0], names)
        if order is None:
            dequantized[kind] = dequantized.get(kind, 0) + 1
            continue
        weight = from_gguf(tensor.data, kind, shape)
        if not np.array_equal(order, np.arange(shape[0])):
            weight = QuantizedWeight(weight.blocks[torch.from_numpy(order)].contiguous(), weight.source_type)
        setattr(module, QUANTIZED, weight)
        kept[kind] = kept.get(kind, 0) + 1
    _tie_output(hf_model)
    if dequantized:
        log.info(
            "GGUF %s: de-quantized to the model dtype: %s (blocks are kept for %s)",
            path.name,
            ", ".join(f"{n} x {k}" for k, n in sorted(dequantized.items())),
            ", ".join(SUPPORTED_GGUF_TYPES),
        )
    return kept


def attach_int8(hf_model: torch.nn.Module) -> int:
    """Quantize every linear of the decoder layers and the output head whose in_features are a multiple
    of 32 to int8 blocks of 32 (Q8_0); returns how many."""
    count = 0
    for module in [*hf_model.model.layers.modules(), hf_model.get_output_embeddings()]:
        if isinstance(module, torch.nn.Linear) and module.in_features % 32 == 0:
            setattr(module, QUANTIZED, quantize_int8(module.weight))
            count += 1
    return count


def _module_for(hf_model: torch.nn.Module, hf_name: str | None) -> torch.nn.Module | None:
    if hf_name is None or not hf_name.endswith(".weight"):
        return None
    module = hf_model.get_submodule(hf_name.rsplit(".", 1)[0])
    return module if isinstance(module, torch.nn.Linear | torch.nn.Embedding) else None


def _row_order(processor, name: str, rows: int, names: dict[str, str]) -> np.ndarray | None:
    """Which file row each loaded row is, as the processor reorders the de-quantized weight; None where
    it does more than reorder rows (then the tensor stays de-quantized)."""
    probe = np.arange(rows, dtype=np.float64)[:, None]
    result = processor.process(weights=probe, name=name, tensor_key_mapping=names, parsed_parameters={"tensors": {}})
    order = getattr(result, "weights", None)
    if order is None or getattr(result, "name", name) != name or np.shape(order) != (rows, 1):
        return None
    order = np.asarray(order)[:, 0].astype(np.int64)
    return order if np.array_equal(np.sort(order), np.arange(rows)) else None


def _tie_output(hf_model: torch.nn.Module) -> None:
    """A tied output head uses the token embedding's blocks (the file holds one tensor for both)."""
    head, embedding = hf_model.get_output_embeddings(), hf_model.get_input_embeddings()
    if head is None or quantized_of(head) is not None or quantized_of(embedding) is None:
        return
    if head.weight.data_ptr() == embedding.weight.data_ptr():
        setattr(head, QUANTIZED, quantized_of(embedding))
