"""What several test modules build the same way: a tiny fp32 Llama with LoRA, seeded task
and safety batches, the counts the steps normalise by, and eval results judged from given answers."""

from __future__ import annotations

import peft
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_lora_model(seed: int = 0, dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj"],
                           init_lora_weights=False)  # random B: the adapters start non-zero
    return peft.get_peft_model(model, lora)


def batch(seed: int, n: int = 3, length: int = 10, prompt: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, length), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    mask = torch.ones_like(ids)
    mask[-1, -3:] = 0  # one right-padded row: padding must not count
    labels[-1, -3:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def safety_batch(seed: int, pairs: int = 2) -> dict[str, torch.Tensor]:
    """pairs safe rows then pairs harmful rows sharing their prompts."""
    b = batch(seed, n=2 * pairs)
    b["input_ids"][pairs:, :4] = b["input_ids"][:pairs, :4]
    return b


def trained(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def tokens_of(b) -> float:
    return float((b["labels"][:, 1:] != -100).sum())


def judged_results(harmful: list[dict], answers: list[str], independent: list[dict], answers_independent: list[str],
                   judge, **figures) -> dict:
    """The judged part of an eval.json (`results`) for these prompts and answers, as `evaluate`
    writes it, plus `figures` (task accuracy and the like, which no verdict decides)."""
    from sap_dist.evaluation.evaluate import harmful_summary
    from sap_dist.evaluation.prompt_sets import independent_summary

    summary, rows = harmful_summary(harmful, answers, judge)
    ind_summary, ind_rows = harmful_summary(independent, answers_independent, judge)
    return {**summary, "harmful": rows, **independent_summary(ind_summary, ind_rows), "independent": ind_rows,
            "judge": judge.describe(), **figures}
