"""The streaming GGUF writer: the bytes gguf-py writes for the same content (tensors given in slabs), and misuse
(calls out of order) refused with an OutputError naming the file, never an AttributeError or IndexError."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V
from gguf import GGUFWriter

from mxtools.core.errors import OutputError
from mxtools.io.gguf_writer import GGUFStreamWriter

A = np.arange(3 * 64, dtype=np.float32).reshape(3, 64) / 7
B = np.arange(2 * 34, dtype=np.uint8).reshape(2, 34)  # two raw Q8_0 blocks of 32 values each


def planned(path) -> GGUFStreamWriter:
    w = GGUFStreamWriter(path)
    w.add("general.architecture", V.STRING, "llama")
    w.add("llama.block_count", V.UINT32, 2)
    w.add("tokenizer.ggml.scores", V.ARRAY, [0.5, -1.0], V.FLOAT32)
    w.plan("a.weight", A.shape, Q.F32)
    w.plan("b.weight", (2, 32), Q.Q8_0)
    return w


def test_streamed_in_slabs_equals_gguf_py(tmp_path):
    w = planned(tmp_path / "ours.gguf")
    w.write_header()
    for row in A:  # one slab at a time, as the merged expert tensors are written
        w.write(row)
    w.write(B)
    w.close()
    ref = GGUFWriter(tmp_path / "ref.gguf", "llama")
    ref.add_uint32("llama.block_count", 2)
    ref.add_array("tokenizer.ggml.scores", [0.5, -1.0])
    ref.add_tensor("a.weight", A)
    ref.add_tensor("b.weight", B, raw_dtype=Q.Q8_0)
    ref.write_header_to_file()
    ref.write_kv_data_to_file()
    ref.write_tensors_to_file()
    ref.close()
    assert (tmp_path / "ours.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()


def test_tensor_data_before_the_header_is_refused(tmp_path):
    w = planned(tmp_path / "o.gguf")
    with pytest.raises(OutputError, match="before the GGUF header") as err:
        w.write(A[0])
    assert err.value.file == str(tmp_path / "o.gguf")
    with pytest.raises(OutputError, match="before the GGUF header"):
        w.close()
    assert not (tmp_path / "o.gguf").exists()


def test_other_calls_out_of_order_are_refused(tmp_path):
    w = planned(tmp_path / "o.gguf")
    w.write_header()
    with pytest.raises(OutputError, match="already written"):
        w.write_header()
    with pytest.raises(OutputError, match="metadata added after"):
        w.add("general.name", V.STRING, "late")
    with pytest.raises(OutputError, match="planned after"):
        w.plan("c.weight", (32,), Q.F32)
    with pytest.raises(OutputError, match="more data than planned"):
        w.write(np.zeros(4 * 64, np.float32))
    with pytest.raises(OutputError, match="only 0 of 2 tensors"):
        w.close()
    w.write(A)
    w.write(B)
    with pytest.raises(OutputError, match="after all 2 planned tensors"):
        w.write(B)
    w.close()
