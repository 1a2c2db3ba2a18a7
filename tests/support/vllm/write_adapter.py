"""Writes a LoRA adapter for a Llama-shaped model, for the tests that serve adapters.

Run by `vllm_server.ensure_adapter` with the vLLM venv's interpreter (torch,
safetensors), so the tests' own venv needs neither:

    write_adapter.py --base MODEL_DIR --out NEW_DIR --rank 8

The PEFT layout vLLM loads (`adapter_config.json`, `adapter_model.safetensors`),
of the rank given (vllm_server.ADAPTER_RANK) on every layer's `q_proj` and
`v_proj`, with seeded random weights large enough that the adapter visibly
changes the answers (greedy decoding with SmolLM2: "The capital of France is
Paris. It is a city that" where the base model stops after "Paris."). It means
nothing; it shows that the adapter was applied.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_adapter(base: Path, out: Path, rank: int) -> None:
    """Writes the adapter for the Llama-shaped model in `base` into `out`."""
    config = json.loads((base / "config.json").read_text())
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    kv = int(config["num_key_value_heads"]) * head_dim
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(int(config["num_hidden_layers"])):
        for module, width in (("q_proj", hidden), ("v_proj", kv)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            # B is usually zero at the start of training (no change); large
            # random values make the change show in the first tokens.
            tensors[f"{prefix}.lora_A.weight"] = (
                torch.randn(rank, hidden, generator=generator) * 0.01
            )
            tensors[f"{prefix}.lora_B.weight"] = (
                torch.randn(width, rank, generator=generator) * 0.5
            )
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": str(base),
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rank", type=int, required=True)
    args = parser.parse_args()
    write_adapter(args.base, args.out, args.rank)


if __name__ == "__main__":
    main()
