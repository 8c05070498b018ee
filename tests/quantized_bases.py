"""Quantized linear bases for the tests, built from an nn.Linear: bitsandbytes
4-bit and 8-bit (quantized on the CPU by `.to("cpu")`) and torchao
weight-only configs. The optional libraries are imported by the builders, so
a test that needs one skips where it is missing."""

import copy

import pytest
import torch
from torch import nn


def _bnb():  # bitsandbytes is optional: imported by the tests that need it
    return pytest.importorskip("bitsandbytes")


def bnb_4bit(linear, quant_type="nf4", compute_dtype=torch.float32):
    bitsandbytes = _bnb()
    layer = bitsandbytes.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                       compute_dtype=compute_dtype, quant_type=quant_type)
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")  # quantizes


def bnb_8bit(linear):
    bitsandbytes = _bnb()
    layer = bitsandbytes.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                         has_fp16_weights=False)
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")


def torchao_quantized(linear, config="Int8WeightOnlyConfig", **options):
    quantization = pytest.importorskip("torchao.quantization")
    holder = nn.Sequential(copy.deepcopy(linear))
    quantization.quantize_(holder, getattr(quantization, config)(**options))
    return holder[0]


def torchao_int8(linear):
    return torchao_quantized(linear)


QUANTIZED = {
    "bnb-nf4": lambda lin: bnb_4bit(lin, "nf4"),
    "bnb-fp4": lambda lin: bnb_4bit(lin, "fp4"),
    "bnb-8bit": bnb_8bit,
    "torchao-int8": torchao_int8,
    "torchao-int4": lambda lin: torchao_quantized(lin, "IntxWeightOnlyConfig", weight_dtype=torch.int4),
    "torchao-float8": lambda lin: torchao_quantized(lin, "Float8WeightOnlyConfig"),
}
