"""What the embedded model makes of an answer: the mean hidden state over the answer's tokens at
one layer, read with the prompt before it in the chat template. The `careful-lm` judge reads it
beside the answer's words (`sap_dist.evaluation.careful_judge`).

The reader is always the embedded SmolLM2-135M-Instruct as shipped (fp32), never the model being
judged, so the same answer gets the same state whichever model wrote it. Only the layers up to the
one read are kept, and the language-model head is never run.
"""

from __future__ import annotations

import functools

import torch

STATES_BATCH = 32
"""Answers read per forward pass."""


@functools.lru_cache(maxsize=2)
def _reader(layer: int, cache_dir: str | None = None):
    """(decoder stack cut after `layer`, tokenizer) of the embedded model, loaded once per process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sap_dist.embedded import converted_dir

    path = converted_dir(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).model.eval()
    if not 1 <= layer <= len(model.layers):
        raise ValueError(f"layer {layer} is outside the embedded model's 1..{len(model.layers)}")
    model.layers = model.layers[:layer]
    return model, AutoTokenizer.from_pretrained(path)


def _token_ids(tokenizer, prompt: str, answer: str) -> tuple[list[int], int]:
    """The chat-formatted prompt's ids followed by the answer's, and where the answer starts.
    Tokenized apart so the boundary is exact."""
    head = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)
    if isinstance(head, dict):  # some tokenizers return a BatchEncoding whatever return_dict says
        head = head["input_ids"]
    tail = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return list(head) + list(tail), len(head)


def answer_states(prompts: list[str], answers: list[str], layer: int, batch_size: int = STATES_BATCH,
                  cache_dir: str | None = None) -> torch.Tensor:
    """[n, hidden] float64: per (prompt, answer), the mean over the answer's tokens of the output of
    decoder layer `layer` (1-based); for an empty answer, the state at the prompt's last token."""
    model, tokenizer = _reader(layer, cache_dir)
    captured: list[torch.Tensor] = []

    def keep(_module, _args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    encoded = [_token_ids(tokenizer, p, a) for p, a in zip(prompts, answers)]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # like lengths together: less padding
    hook = model.layers[layer - 1].register_forward_hook(keep)
    out: list[torch.Tensor | None] = [None] * len(encoded)
    try:
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            pairs = [encoded[i] for i in chosen]
            width = max(len(ids) for ids, _ in pairs)
            ids = torch.zeros(len(pairs), width, dtype=torch.long)
            mask = torch.zeros(len(pairs), width, dtype=torch.long)
            for i, (row, _) in enumerate(pairs):  # right padding: causal attention never reads the pads
                ids[i, :len(row)] = torch.tensor(row)
                mask[i, :len(row)] = 1
            captured.clear()
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            hidden = captured[-1]
            for i, (row, answer_start) in enumerate(pairs):
                first = min(answer_start, len(row) - 1)
                out[chosen[i]] = hidden[i, first:len(row)].double().mean(0)
    finally:
        hook.remove()
    return torch.stack(out) if out else torch.zeros(0, model.config.hidden_size, dtype=torch.float64)
