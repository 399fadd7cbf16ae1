"""Write tests/fixtures/paddle/ with real Paddle and PaddleNLP (run in their own virtual environment; the test
suite itself never imports paddle):

    python3 -m venv /work/venvs/paddle
    /work/venvs/paddle/bin/pip install paddlepaddle==3.3.1 paddlenlp==2.8.1 huggingface_hub==0.24.6 \
        aistudio-sdk==0.2.6 datasets==2.20.0 'pyarrow<17'
    /work/venvs/paddle/bin/python tools/paddle_fixtures.py tests/fixtures/paddle

(paddlenlp 2.8.1 imports names that newer huggingface_hub, aistudio-sdk and datasets no longer have, and it
pins numpy below 2, which newer pyarrow refuses: hence the four pins.)

Outputs, from one tiny bfloat16 Mixtral (2 layers, hidden 64, 4 heads / 2 KV heads, 4 experts of width 64,
vocabulary 512, paddle.seed(0)):
  mixtral-pdparams/     save_pretrained(dir) with PaddleNLP's defaults: model_state.pdparams
  mixtral-sharded/      save_pretrained(dir, max_shard_size="100KB"): model_state-0000k-of-00004.pdparams + index
  mixtral-safetensors/  save_pretrained(dir, safe_serialization=True): model.safetensors (numpy format, U16)
  state_dict.pdparams   paddle.save of a small state dict: float32, float16, bfloat16 and int64 tensors
  tensors.json          per file and tensor: shape, dtype and SHA-256 of the bytes paddle.load returns
  VERSIONS              the versions that wrote them
"""
from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path

import numpy as np
import paddle
import paddlenlp
from paddlenlp.transformers import MixtralConfig, MixtralForCausalLM

CONFIG = dict(vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256)


def digest(t) -> dict:
    """What paddle.load gives for a tensor: its shape, dtype and the SHA-256 of its bytes (bfloat16 as bits)."""
    a = t.numpy() if hasattr(t, "numpy") else np.asarray(t)
    return {"shape": list(a.shape), "dtype": str(t.dtype).removeprefix("paddle."),
            "sha256": hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()}


def loaded(path: Path) -> dict:
    sd = paddle.load(str(path))
    return {k: digest(v) for k, v in sd.items() if not k.endswith("@@")}


def model_dirs(out: Path) -> dict:
    paddle.seed(0)
    model = MixtralForCausalLM.from_config(MixtralConfig(**CONFIG), dtype="bfloat16")
    model.save_pretrained(str(out / "mixtral-pdparams"))
    model.save_pretrained(str(out / "mixtral-sharded"), max_shard_size="100KB")
    model.save_pretrained(str(out / "mixtral-safetensors"), safe_serialization=True)
    digests = {"mixtral-pdparams/model_state.pdparams": loaded(out / "mixtral-pdparams" / "model_state.pdparams")}
    for shard in sorted((out / "mixtral-sharded").glob("*.pdparams")):
        digests[f"mixtral-sharded/{shard.name}"] = loaded(shard)
    return digests


def state_dict(out: Path) -> dict:
    paddle.seed(1)
    sd = {"f32": paddle.randn([3, 5], dtype="float32"), "f16": paddle.randn([4, 2], dtype="float16"),
          "bf16": paddle.randn([2, 3, 4], dtype="float32").astype("bfloat16"),
          "i64": paddle.arange(6, dtype="int64").reshape([2, 3]), "big": paddle.randn([40, 30], dtype="float32")}
    paddle.save(sd, str(out / "state_dict.pdparams"))
    return {"state_dict.pdparams": loaded(out / "state_dict.pdparams")}


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    digests = {**model_dirs(out), **state_dict(out)}
    (out / "tensors.json").write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
    versions = {"python": platform.python_version(), "paddlepaddle": paddle.__version__,
                "paddlenlp": paddlenlp.__version__, "numpy": np.__version__, "script": "tools/paddle_fixtures.py"}
    (out / "VERSIONS").write_text("".join(f"{k} {v}\n" for k, v in versions.items()))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
