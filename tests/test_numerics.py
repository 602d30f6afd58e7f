"""moco_fast.numerics: the fp32 matmul precision read never raises, whichever torch API set it."""

import math

import pytest
import torch
from conftest import NEW_PRECISION_API

from moco_fast import numerics


def test_constants():
    assert numerics.LOG2E == 1.0 / math.log(2.0)
    assert numerics.LN2 == math.log(2.0)


@pytest.mark.parametrize("legacy, expected", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_legacy_api(restore_precision, legacy, expected):
    torch.set_float32_matmul_precision(legacy)
    assert numerics.fp32_matmul_precision() == expected


@pytest.mark.skipif(not NEW_PRECISION_API, reason="torch < 2.9 has no fp32_precision API")
@pytest.mark.parametrize("global_setting", ["none", "tf32", "ieee"])
@pytest.mark.parametrize("matmul_setting, expected", [("tf32", "tf32"), ("ieee", "ieee")])
def test_new_api_never_raises(restore_precision, global_setting, matmul_setting, expected):
    torch.backends.fp32_precision = global_setting
    torch.backends.cuda.matmul.fp32_precision = matmul_setting
    if matmul_setting == "tf32":
        with pytest.raises(RuntimeError):  # what the code used to call on every forward
            torch.get_float32_matmul_precision()
    assert numerics.fp32_matmul_precision() == expected


@pytest.mark.skipif(not NEW_PRECISION_API, reason="torch < 2.9 has no fp32_precision API")
def test_new_global_setting_is_inherited(restore_precision):
    torch.backends.cuda.matmul.fp32_precision = "none"  # conftest's legacy "highest" set it to "ieee"
    torch.backends.fp32_precision = "tf32"
    assert numerics.fp32_matmul_precision() == "tf32"
