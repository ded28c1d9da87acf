"""A Megatron ``torch_dist`` checkpoint of a Llama to a Hugging Face directory, as llm-jp's and Megatron-LM's
converters do: megatron-core's ``load_plain_tensors`` reads every tensor whole, the fused tensors are split
back, and the weights are written as ``model.safetensors`` beside the run's config.json and tokenizer.

usage: python megatron_to_hf.py MEGATRON_DIR OUTPUT_DIR HF_ASSETS_DIR
"""

import json
import shutil
import sys
from pathlib import Path

from safetensors.torch import save_file

from megatron_cpu import single_process_group


def hf_state(megatron: dict, config: dict) -> dict:
    heads, groups = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["hidden_size"] // heads
    state = {"model.embed_tokens.weight": megatron["embedding.word_embeddings.weight"],
             "model.norm.weight": megatron["decoder.final_layernorm.weight"]}
    if "output_layer.weight" in megatron:
        state["lm_head.weight"] = megatron["output_layer.weight"]
    for layer in range(config["num_hidden_layers"]):
        prefix, hf_prefix = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        qkv = megatron[prefix + "self_attention.linear_qkv.weight"]
        qkv = qkv.view(groups, (heads // groups + 2) * head_dim, -1)
        q, k, v = qkv.split([heads // groups * head_dim, head_dim, head_dim], dim=1)
        for name, tensor in zip("qkv", (q, k, v)):
            state[f"{hf_prefix}self_attn.{name}_proj.weight"] = tensor.reshape(-1, qkv.shape[-1])
        state[hf_prefix + "input_layernorm.weight"] = megatron[prefix + "self_attention.linear_qkv.layer_norm_weight"]
        state[hf_prefix + "self_attn.o_proj.weight"] = megatron[prefix + "self_attention.linear_proj.weight"]
        gate, up = megatron[prefix + "mlp.linear_fc1.weight"].chunk(2)
        state[hf_prefix + "mlp.gate_proj.weight"], state[hf_prefix + "mlp.up_proj.weight"] = gate, up
        state[hf_prefix + "post_attention_layernorm.weight"] = megatron[prefix + "mlp.linear_fc1.layer_norm_weight"]
        state[hf_prefix + "mlp.down_proj.weight"] = megatron[prefix + "mlp.linear_fc2.weight"]
    return {name: tensor.contiguous() for name, tensor in state.items()}


def main(source: Path, output: Path, assets: Path) -> None:
    single_process_group()
    from megatron.core.dist_checkpointing import load_plain_tensors

    config = json.loads((assets / "config.json").read_text())
    save_file(hf_state(load_plain_tensors(str(source)), config), output / "model.safetensors",
              metadata={"format": "pt"})
    for path in assets.iterdir():
        shutil.copy(path, output)


if __name__ == "__main__":
    main(*map(Path, sys.argv[1:]))
