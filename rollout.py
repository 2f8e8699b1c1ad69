"""Rollout: sample a group of G answers per question with a hand-written KV-cache loop.

This is the "explore" half of Med-Evo's test-time loop (and of GRPO): for each unlabeled question
the policy samples G candidate answers; pseudo labelling (centroid.py) and rewards (reward.py)
then judge them against each other.

Three pieces, top to bottom:
  1. `build_inputs`  - the chat-template prompt with the image, each <|image_pad|> expanded into the
                       number of merged vision tokens the image gives, batched with left padding.
  2. `sample`        - prefill once per question (vision tower + prompt computed once), copy the KV
                       cache to G rows, then decode token by token with temperature / top-p and a
                       per-row EOS stop. temperature=0 is greedy and equals `model.generate`.
  3. `completion_logits_and_hidden` - one teacher-forced pass over prompt + answers, giving the
                       logits that GRPO needs (in fp32: `answer_logits`) and the last-layer hidden
                       states FPL needs. Each prompt is encoded once for its G answers (one packed row
                       per question under a 4-D mask, with sdpa / eager attention; flash-attention
                       repeats the prompt per answer). Under FSDP it runs as one registered forward
                       (parallel.as_forward).

Qwen2.5-VL uses 3-D rotary positions (temporal, height, width): text tokens advance all three
together, the image tokens of a grid share a start and spread over height and width. So after the
prompt, the next text position is one past the largest position used so far, not the sequence length.
"""

from dataclasses import dataclass

import torch

from data import open_image  # re-exported: rollout.open_image is the reader every stage uses
from scale import parallel

DEFAULT_PROMPT_SUFFIX = " Answer the question using a single word or phrase."


# ----------------------------------------------------------------------------------------------
# 1. Inputs


def build_inputs(tokenizer, image_processor, records, prompt_suffix=DEFAULT_PROMPT_SUFFIX, device="cpu"):
    """Tokenised prompts for a batch of records (each with `image` and `question`), left-padded.

    Returns a dict: input_ids [B, L], attention_mask [B, L], mm_token_type_ids [B, L] (1 on image
    tokens), pixel_values [sum of patches, C*T*P*P], image_grid_thw [B, 3].
    """
    images = [open_image(r["image"]) for r in records]
    vision = image_processor(images=images, return_tensors="pt")
    image_token = "<|image_pad|>"
    merge = image_processor.merge_size
    texts = []
    for record, grid in zip(records, vision["image_grid_thw"]):
        messages = [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": record["question"] + prompt_suffix}]}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if text.count(image_token) != 1:
            raise ValueError(f"the chat template must place exactly one {image_token} per image, got: {text!r}")
        n_image_tokens = int(grid.prod()) // merge**2  # patches, then merge x merge patches per token
        texts.append(text.replace(image_token, image_token * n_image_tokens))
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    image_token_id = tokenizer.convert_tokens_to_ids(image_token)
    return {
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": batch["attention_mask"].to(device),
        "mm_token_type_ids": (batch["input_ids"] == image_token_id).int().to(device),
        "pixel_values": vision["pixel_values"].to(device),
        "image_grid_thw": vision["image_grid_thw"].to(device),
    }


def prompt_positions(model, prompt):
    """3-D rotary positions of the prompt tokens [3, B, L], and each row's next text position [B]."""
    positions, _ = model.model.get_rope_index(
        prompt["input_ids"],
        mm_token_type_ids=prompt["mm_token_type_ids"],
        image_grid_thw=prompt["image_grid_thw"],
        attention_mask=prompt["attention_mask"],
    )
    next_position = positions.amax(dim=(0, 2)) + 1  # [B]; padding sits at 0, so it never wins
    return positions, next_position


# ----------------------------------------------------------------------------------------------
# 2. Sampling


@dataclass
class Rollout:
    completion_ids: torch.Tensor  # [B*G, T] answer tokens; rows of one question are consecutive
    completion_mask: torch.Tensor  # [B*G, T] 1 on answer tokens including EOS, 0 on padding
    texts: list  # B*G decoded answers (special tokens dropped)


def eos_token_ids(model, tokenizer):
    eos = model.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    return [eos] if isinstance(eos, int) else list(eos)


def next_tokens(logits, temperature, top_p, generator):
    """One token per row from logits [N, V]: argmax when temperature == 0, else top-p sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        # keep the smallest prefix whose mass reaches top_p (masked_fill: no host sync, unlike boolean indexing)
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def sample(model, tokenizer, prompt, group_size=1, max_new_tokens=16, temperature=1.0, top_p=1.0, generator=None,
           lagged_stop=None):
    """G answers per prompt row: prefill once, share the KV cache across the group, decode.

    The loop stops once every row has emitted EOS. Reading that from a GPU waits for the GPU, once per
    token; with lagged_stop (the default on CUDA) the flag is copied to the host without waiting and read
    one token later, before the next token is drawn: one decode step may run in vain, but the tokens and
    the generator's state are those of the immediate check (the default on CPU, where reading is free).
    """
    B, L = prompt["input_ids"].shape
    N = B * group_size
    positions, next_position = prompt_positions(model, prompt)
    out = model(
        input_ids=prompt["input_ids"],
        attention_mask=prompt["attention_mask"],
        position_ids=positions,
        pixel_values=prompt["pixel_values"],
        image_grid_thw=prompt["image_grid_thw"],
        use_cache=True,
        logits_to_keep=1,
    )
    cache = out.past_key_values
    cache.batch_repeat_interleave(group_size)  # [B, ...] -> [B*G, ...], each prompt's rows together
    logits = out.logits[:, -1].repeat_interleave(group_size, dim=0)  # [N, V]
    attention_mask = prompt["attention_mask"].repeat_interleave(group_size, dim=0)  # [N, L]
    next_position = next_position.repeat_interleave(group_size)  # [N]

    eos = torch.tensor(eos_token_ids(model, tokenizer), device=logits.device)
    pad = tokenizer.pad_token_id
    tokens, finished = [], torch.zeros(N, dtype=torch.bool, device=logits.device)
    lagged_stop = logits.device.type == "cuda" if lagged_stop is None else lagged_stop
    all_finished = None  # lagged: every row's EOS as of the previous token, on its way to the host
    for step in range(max_new_tokens):
        if all_finished is not None and all_finished.read():
            break  # the previous token ended every row: the immediate check would have stopped there
        token = next_tokens(logits, temperature, top_p, generator)
        token = torch.where(finished, torch.full_like(token, pad), token)  # finished rows emit padding
        tokens.append(token)
        finished |= torch.isin(token, eos)
        if step == max_new_tokens - 1:
            break
        if lagged_stop:
            all_finished = HostFlag(finished.all())
        elif finished.all():
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        position = (next_position + step).view(1, N, 1).expand(3, N, 1)  # text: same index on t, h, w
        out = model(
            input_ids=token[:, None],
            attention_mask=attention_mask,
            position_ids=position,
            past_key_values=cache,
            use_cache=True,
        )
        logits = out.logits[:, -1]

    completion_ids = torch.stack(tokens, dim=1)  # [N, T]
    completion_mask = completion_mask_from_ids(completion_ids, eos)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, pad)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollout(completion_ids, completion_mask, [t.strip() for t in texts])


class HostFlag:
    """A 0-dim bool tensor copied to the host without waiting for the device; read() waits for the copy only."""

    def __init__(self, flag):
        if flag.device.type != "cuda":
            self.flag, self.copied = flag, None
            return
        self.flag = torch.empty((), dtype=torch.bool, pin_memory=True)
        self.flag.copy_(flag, non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()

    def read(self):
        if self.copied is not None:
            self.copied.synchronize()
        return bool(self.flag)


def completion_mask_from_ids(completion_ids, eos):
    """1 up to and including the first EOS of each row (all ones if a row never stops)."""
    is_eos = torch.isin(completion_ids, eos).int()
    eos_seen_before = is_eos.cumsum(dim=1) - is_eos  # how many EOS strictly before this token
    return (eos_seen_before == 0).long()


def generate_answers(model, tokenizer, image_processor, records, batch_size=16, prompt_suffix=DEFAULT_PROMPT_SUFFIX,
                     group_size=1, max_new_tokens=16, temperature=0.0, top_p=1.0, generator=None, device=None):
    """Answer texts for every record, in order (G per record, consecutive); greedy by default. device: where the
    model computes (default its parameters'; under --offload they are on the host, so the run passes its own)."""
    texts = []
    for start in range(0, len(records), batch_size):
        prompt = build_inputs(tokenizer, image_processor, records[start : start + batch_size], prompt_suffix,
                              model.device if device is None else device)
        texts += sample(model, tokenizer, prompt, group_size, max_new_tokens, temperature, top_p, generator).texts
    return texts


# ----------------------------------------------------------------------------------------------
# 3. Teacher-forced pass over prompt + answers (GRPO's log-probs, FPL's features, warm start's loss)

# Attention implementations that take a ready 4-D mask unchanged (transformers 5.23: create_causal_mask returns a
# 4-D mask as it is; sdpa hands a bool mask to torch's scaled_dot_product_attention, eager adds a float one to the
# scores). flash_attention_2/3 read any mask as a [B, S] padding mask and flex_attention wants a BlockMask, so
# they (and any other) take the unshared pass.
SHARED_PREFIX_ATTENTION = ("sdpa", "eager")
_notices_printed = set()


def completion_logits_and_hidden(model, prompt, completion_ids, completion_mask, group_size):
    """Logits predicting each answer token [N, T, V] (fp32) and the hidden states at those tokens [N, T, D].

    N = B x G: the G answers of question b are rows b*G .. b*G+G-1. The vision tower runs once per question
    and, with sdpa or eager attention, the language model reads each prompt once too: one packed row per
    question, [prompt | answer 1 | ... | answer G], where every answer sees the prompt and its own earlier
    tokens only (`completion_logits_and_hidden_shared`). Other attention implementations cannot take that
    mask and repeat the prompt for each answer (`completion_logits_and_hidden_unshared`, a notice says so once).
    Both give the same numbers to floating-point rounding. With G = 1 there is nothing to share and the two
    layouts hold the same tokens, so the unshared pass runs (no 4-D mask; the warm start of models/tiny.py
    computes as it did when the shipped base models were built). `hidden` is the last decoder layer's output
    (after the final norm) at the answer tokens themselves: FPL averages it over each answer, at no extra
    forward pass.
    """
    if group_size == 1:
        return completion_logits_and_hidden_unshared(model, prompt, completion_ids, completion_mask, group_size)
    refusal = shared_prefix_refusal(model)
    if refusal is None:
        return completion_logits_and_hidden_shared(model, prompt, completion_ids, completion_mask, group_size)
    if refusal not in _notices_printed:
        _notices_printed.add(refusal)
        print(f"note: {refusal}; the teacher-forced pass repeats each prompt for its {group_size} answers "
              f"(no prefix sharing)", flush=True)
    return completion_logits_and_hidden_unshared(model, prompt, completion_ids, completion_mask, group_size)


def shared_prefix_refusal(model):
    """None when the language model can run the shared-prefix layout, else why not (one line)."""
    config = model.model.language_model.config  # the config its attention layers read
    implementation = config._attn_implementation
    if implementation not in SHARED_PREFIX_ATTENTION:
        return f"attention {implementation!r} takes no 4-D attention mask"
    sliding = sorted(set(getattr(config, "layer_types", None) or []) - {"full_attention"})
    if sliding:  # a ready 4-D mask would replace the sliding-window mask of those layers
        return f"layer types {sliding} need their own masks"
    return None


def prompt_embeddings(model, prompt):
    """The prompt's input embeddings [B, L, D] with the merged image embeddings in place (vision tower once)."""
    prompt_embeds = model.get_input_embeddings()(prompt["input_ids"])  # [B, L, D]
    image_embeds = torch.cat(
        model.model.get_image_features(prompt["pixel_values"], prompt["image_grid_thw"]).pooler_output)
    image_mask = (prompt["mm_token_type_ids"] == 1).unsqueeze(-1)
    return prompt_embeds.masked_scatter(image_mask, image_embeds.to(prompt_embeds.dtype))


def completion_logits_and_hidden_unshared(model, prompt, completion_ids, completion_mask, group_size):
    """completion_logits_and_hidden with each prompt repeated for its G answers: [N, L+T] rows.

    The language model recomputes every prompt G times; kept as the reference of the shared layout (tests, bench)
    and as the pass of G = 1 and of attention implementations that take no 4-D mask (flash-attention).
    """
    input_ids, attention_mask = prompt["input_ids"], prompt["attention_mask"]  # [B, L]
    B, L = input_ids.shape
    prompt_embeds = prompt_embeddings(model, prompt)  # [B, L, D]

    positions, next_position = prompt_positions(model, prompt)  # [3, B, L], [B]
    T = completion_ids.shape[1]
    answer_positions = next_position[:, None] + torch.arange(T, device=input_ids.device)  # [B, T]
    positions = torch.cat([positions, answer_positions.unsqueeze(0).expand(3, B, T)], dim=2)  # [3, B, L+T]
    positions = positions.repeat_interleave(group_size, dim=1)  # [3, N, L+T]

    embed = model.get_input_embeddings()
    inputs_embeds = torch.cat([prompt_embeds.repeat_interleave(group_size, dim=0), embed(completion_ids)], dim=1)
    mask = torch.cat([attention_mask.repeat_interleave(group_size, dim=0), completion_mask], dim=1)  # [N, L+T]
    hidden = model.model.language_model(
        inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=positions, use_cache=False
    ).last_hidden_state  # [N, L+T, D]
    return answer_logits(model, hidden[:, L - 1 : L + T - 1]), hidden[:, L:]  # position i predicts answer token i


def completion_logits_and_hidden_shared(model, prompt, completion_ids, completion_mask, group_size):
    """completion_logits_and_hidden with each prompt encoded once (Prefix Grouper, arXiv 2506.05433).

    One row per question, [prompt (L, left-padded) | answer 1 (T) | ... | answer G (T)], S = L + G*T tokens
    instead of G*(L+T), under a [B, 1, S, S] mask (`shared_prefix_mask`): the prompt is causal over its real
    tokens, each answer sees the prompt's real tokens and its own real earlier tokens, never another answer.
    Answer token i of every answer sits at rotary position next_position + i (the position it has after the
    prompt alone), not at its packed index. Since prompts are left-padded, index L-1 is every prompt's last
    token: its hidden state predicts the first token of each of the G answers. No KV cache: gradient
    checkpointing (transformers' GradientCheckpointingLayer) drops any cache passed to a layer.
    Memory: the mask is B S^2 bools, and SDPA makes an additive copy of it in the compute dtype in every layer,
    which it keeps for backward (scale/memory.py counts both); with a mask, CUDA's SDPA runs its memory-efficient
    kernel rather than flash, as the unshared pass already did whenever a prompt was padded.
    """
    input_ids, attention_mask = prompt["input_ids"], prompt["attention_mask"]  # [B, L]
    B, L = input_ids.shape
    N, T = completion_ids.shape
    G = group_size
    if N != B * G:
        raise ValueError(f"{N} answer rows for {B} prompts x group size {G}")
    prompt_embeds = prompt_embeddings(model, prompt)  # [B, L, D]
    D = prompt_embeds.shape[-1]
    answer_embeds = model.get_input_embeddings()(completion_ids)  # [N, T, D]
    inputs_embeds = torch.cat([prompt_embeds, answer_embeds.reshape(B, G * T, D)], dim=1)  # [B, S, D]

    positions, next_position = prompt_positions(model, prompt)  # [3, B, L], [B]
    answer_positions = (next_position[:, None] + torch.arange(T, device=input_ids.device)).repeat(1, G)  # [B, G*T]
    positions = torch.cat([positions, answer_positions.unsqueeze(0).expand(3, B, G * T)], dim=2)  # [3, B, S]

    mask = shared_prefix_mask(attention_mask, completion_mask.reshape(B, G * T), G)  # [B, 1, S, S] bool
    if model.model.language_model.config._attn_implementation == "eager":  # eager adds the mask to the scores
        mask = additive_mask(mask, inputs_embeds.dtype)
    hidden = model.model.language_model(
        inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=positions, use_cache=False
    ).last_hidden_state  # [B, S, D]

    answers = hidden[:, L:].reshape(B, G, T, D)
    last_prompt = hidden[:, L - 1 : L].unsqueeze(1).expand(B, G, 1, D)  # predicts every answer's first token
    before = torch.cat([last_prompt, answers[:, :, : T - 1]], dim=2)  # position i predicts answer token i
    return answer_logits(model, before.reshape(N, T, D)), answers.reshape(N, T, D)


def shared_prefix_mask(prompt_mask, answer_mask, group_size):
    """[B, 1, S, S] bool, True where a query (row) may attend to a key (column), S = L + G*T.

    prompt_mask [B, L] (left padding 0), answer_mask [B, G*T] (the G answers' masks side by side, 0 after EOS).
    Key j is visible from query q when j <= q, j is a real token, and j is in the prompt or in q's own answer:
    the causal padding mask the unshared pass builds for each [prompt | answer] row, cut out of one packed row.
    """
    B, L = prompt_mask.shape
    S = L + answer_mask.shape[1]
    T = answer_mask.shape[1] // group_size
    device = prompt_mask.device
    segment = torch.cat([torch.zeros(L, dtype=torch.long, device=device),
                         torch.arange(1, group_size + 1, device=device).repeat_interleave(T)])  # 0: prompt, k: answer k
    index = torch.arange(S, device=device)
    allowed = (index[None, :] <= index[:, None]) & ((segment[None, :] == 0) | (segment[None, :] == segment[:, None]))
    real = torch.cat([prompt_mask, answer_mask], dim=1).bool()  # [B, S]
    return allowed[None, None] & real[:, None, None, :]


def additive_mask(mask, dtype):
    """A bool mask as eager attention adds it to the scores: 0 where allowed, the dtype's minimum elsewhere
    (masking_utils.eager_mask's conversion)."""
    return torch.where(mask, torch.zeros((), device=mask.device, dtype=dtype), torch.finfo(dtype).min)


def answer_logits(model, hidden):
    """lm_head on hidden [N, T, D] -> logits [N, T, V] in fp32, whatever the compute dtype.

    bf16 logits are rounded in steps of 0.125 around 16-32, which moves a token's log-prob by up to ~0.06
    and gives the k3 KL a noise floor; with T <= 16 answer positions the fp32 logits are small. The weight
    is the one the pass computes with (bf16 when gathered by FSDP, the fp32 master under autocast).
    """
    head = model.lm_head
    with torch.autocast(hidden.device.type, enabled=False):
        return torch.nn.functional.linear(hidden.float(), head.weight.float(), None if head.bias is None else
                                          head.bias.float())


# ----------------------------------------------------------------------------------------------
# 4. The teacher-forced pass of a step, and the answers GRPO trains on


def teacher_forced(model, prompt, out, group_size, dtype):
    """Logits [N, T, V] (fp32) and hidden states [N, T, D] of a rollout's answers, in the compute dtype;
    sharded, the whole pass is one registered FSDP forward (parallel.as_forward)."""
    with parallel.compute_precision(model, dtype):
        return parallel.as_forward(model, completion_logits_and_hidden, prompt, out.completion_ids,
                                   out.completion_mask, group_size)


def select_rows(out, rows):
    """The sub-rollout of the given answer rows."""
    return Rollout(out.completion_ids[rows], out.completion_mask[rows], [out.texts[r] for r in rows])


def first_of_each_group(out, label_samples, group_size):
    """The G answers of each question that GRPO trains on: the first G of its N label samples."""
    if label_samples == group_size:
        return out
    return select_rows(out, [r for r in range(len(out.texts)) if r % label_samples < group_size])
