"""Save Hugging Face Llama checkpoints as Megatron-LM's trainer does: megatron-core's ``dist_checkpointing.save``
(the ``torch_dist`` backend) of the GPT model's state under Megatron's names (fused QKV in query groups, fused
gate and up projections, layer norms fused into the next linear as Transformer Engine names them), into
``iter_{step:07d}/``, then ``latest_checkpointed_iteration.txt``.

usage: python save_megatron.py RUN_DIR HF_CHECKPOINT:STEP ...
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from megatron_cpu import single_process_group


def megatron_state(hf: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    heads, groups = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["hidden_size"] // heads
    state = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
             "decoder.final_layernorm.weight": hf["model.norm.weight"]}
    if "lm_head.weight" in hf and not config.get("tie_word_embeddings"):
        state["output_layer.weight"] = hf["lm_head.weight"]
    for layer in range(config["num_hidden_layers"]):
        hf_prefix, prefix = f"model.layers.{layer}.", f"decoder.layers.{layer}."
        q, k, v = (hf[f"{hf_prefix}self_attn.{name}_proj.weight"] for name in "qkv")
        q = q.view(groups, heads // groups * head_dim, -1)
        k, v = (tensor.view(groups, head_dim, -1) for tensor in (k, v))
        state[prefix + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1])
        state[prefix + "self_attention.linear_qkv.layer_norm_weight"] = hf[hf_prefix + "input_layernorm.weight"]
        state[prefix + "self_attention.linear_proj.weight"] = hf[hf_prefix + "self_attn.o_proj.weight"]
        state[prefix + "mlp.linear_fc1.weight"] = torch.cat([hf[hf_prefix + "mlp.gate_proj.weight"],
                                                             hf[hf_prefix + "mlp.up_proj.weight"]])
        state[prefix + "mlp.linear_fc1.layer_norm_weight"] = hf[hf_prefix + "post_attention_layernorm.weight"]
        state[prefix + "mlp.linear_fc2.weight"] = hf[hf_prefix + "mlp.down_proj.weight"]
    return state


def main(run_dir: Path, checkpoints: list[str]) -> None:
    single_process_group()
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    for argument in checkpoints:
        hf_dir, step = argument.rsplit(":", 1)
        config = json.loads((Path(hf_dir) / "config.json").read_text())
        state = megatron_state(load_file(Path(hf_dir) / "model.safetensors"), config)
        target = run_dir / f"iter_{int(step):07d}"
        target.mkdir(parents=True)
        dist_checkpointing.save({name: ShardedTensor.from_rank_offsets(name, tensor.contiguous())
                                 for name, tensor in state.items()}, str(target))
        (run_dir / "latest_checkpointed_iteration.txt").write_text(f"{int(step)}\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
