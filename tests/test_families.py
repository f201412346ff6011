"""The family matrix (tests/family_matrix.py) over every causal-LM model type the installed transformers
registers: each is refused by kvkeep from its config alone, with a one-line reason, or passes every check."""

from __future__ import annotations

import warnings

import pytest
import transformers as tf
from family_matrix import check, model_types, tiny_config

from kvkeep.hf import check_config


@pytest.mark.parametrize("model_type", model_types())
def test_every_registered_causal_lm_is_refused_with_a_reason_or_passes(model_type):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        verbosity = tf.logging.get_verbosity()
        tf.logging.set_verbosity_error()
        try:
            row = check(model_type)
        finally:
            tf.logging.set_verbosity(verbosity)
    if row["status"] == "skipped":
        pytest.skip(f"{model_type}: {row['reason']}")
    assert row["status"] != "fail", f"{model_type}: {row['reason']}"
    if row["status"] == "refused":
        with pytest.raises(ValueError) as info:
            check_config(tiny_config(model_type))
        assert str(info.value) == f"kvkeep cannot run model type '{model_type}': {row['reason']}"
        assert "\n" not in str(info.value)
