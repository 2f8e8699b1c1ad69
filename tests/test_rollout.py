"""rollout.py against transformers' own code: input building, greedy == generate, sampling, teacher forcing."""

import numpy as np
import torch
from PIL import Image

import rollout


def test_image_token_count_matches_grid(tiny, image_records):
    model, tokenizer, image_processor = tiny
    prompt = rollout.build_inputs(tokenizer, image_processor, image_records)
    grids = prompt["image_grid_thw"]
    assert len({tuple(g.tolist()) for g in grids}) > 1, "the fixture should give different image grids"
    n_image_tokens = prompt["mm_token_type_ids"].sum(dim=1)
    expected = grids.prod(dim=1) // image_processor.merge_size**2
    assert torch.equal(n_image_tokens, expected)
    assert prompt["pixel_values"].shape[0] == grids.prod(dim=1).sum()
    # left padding: every row ends with the assistant turn, padding sits at the start
    assert prompt["attention_mask"][:, -1].all()
    assert len(set(prompt["attention_mask"].sum(1).tolist())) > 1, "prompts should differ in length"


def test_greedy_equals_generate(tiny, image_records):
    model, tokenizer, image_processor = tiny
    prompt = rollout.build_inputs(tokenizer, image_processor, image_records)
    ours = rollout.sample(model, tokenizer, prompt, group_size=1, max_new_tokens=12, temperature=0)
    reference = model.generate(**prompt, do_sample=False, max_new_tokens=12)
    reference = reference[:, prompt["input_ids"].shape[1]:]
    assert torch.equal(ours.completion_ids, reference)


def test_greedy_group_rows_equal_single(tiny, image_records):
    model, tokenizer, image_processor = tiny
    prompt = rollout.build_inputs(tokenizer, image_processor, image_records[:3])
    one = rollout.sample(model, tokenizer, prompt, group_size=1, max_new_tokens=10, temperature=0)
    four = rollout.sample(model, tokenizer, prompt, group_size=4, max_new_tokens=10, temperature=0)
    assert torch.equal(four.completion_ids, one.completion_ids.repeat_interleave(4, dim=0))


def test_seeded_sampling_is_reproducible_and_group_differs(tiny, image_records):
    model, tokenizer, image_processor = tiny
    prompt = rollout.build_inputs(tokenizer, image_processor, image_records[:2])

    def draw(seed):
        generator = torch.Generator().manual_seed(seed)
        return rollout.sample(model, tokenizer, prompt, group_size=6, max_new_tokens=8,
                              temperature=1.0, top_p=1.0, generator=generator)

    a, b, c = draw(1), draw(1), draw(2)
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts
    assert not torch.equal(a.completion_ids, c.completion_ids)
    first_group = a.completion_ids[:6]
    assert len({tuple(row.tolist()) for row in first_group}) > 1


def test_completion_mask_includes_eos_excludes_padding():
    eos = torch.tensor([2, 0])
    ids = torch.tensor([[5, 6, 2, 0, 0], [7, 8, 9, 10, 11], [2, 0, 0, 0, 0]])
    mask = rollout.completion_mask_from_ids(ids, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_top_p_keeps_only_the_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps {0, 1}; top_p tiny keeps only the argmax
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(4000, 1)
    generator = torch.Generator().manual_seed(0)
    drawn = rollout.next_tokens(logits, temperature=1.0, top_p=0.7, generator=generator)
    assert set(drawn.tolist()) == {0, 1}
    share_of_0 = (drawn == 0).float().mean().item()
    assert abs(share_of_0 - 0.5 / 0.8) < 0.03  # renormalised inside the nucleus
    drawn = rollout.next_tokens(logits, temperature=1.0, top_p=1e-6, generator=generator)
    assert set(drawn.tolist()) == {0}
    assert torch.equal(rollout.next_tokens(logits[:1], 0.0, 1.0, None), torch.tensor([0]))


def test_teacher_forced_logits_match_full_forward(tiny, image_records):
    """completion_logits_and_hidden (vision once, repeated per group) == the model's own forward."""
    model, tokenizer, image_processor = tiny
    records = image_records[:3]
    G = 2
    prompt = rollout.build_inputs(tokenizer, image_processor, records)
    generator = torch.Generator().manual_seed(0)
    out = rollout.sample(model, tokenizer, prompt, group_size=G, max_new_tokens=6, temperature=1.0,
                         generator=generator)
    with torch.no_grad():
        logits, hidden = rollout.completion_logits_and_hidden(model, prompt, out.completion_ids,
                                                              out.completion_mask, G)
    L = prompt["input_ids"].shape[1]
    T = out.completion_ids.shape[1]
    for row in range(len(records) * G):
        q = row // G
        keep = prompt["attention_mask"][q].bool()
        ids = torch.cat([prompt["input_ids"][q][keep], out.completion_ids[row][out.completion_mask[row].bool()]])
        n_answer = int(out.completion_mask[row].sum())
        first_patch = int(prompt["image_grid_thw"][:q].prod(dim=1).sum())
        n_patches = int(prompt["image_grid_thw"][q].prod())
        with torch.no_grad():
            full = model(
                input_ids=ids[None],
                pixel_values=prompt["pixel_values"][first_patch : first_patch + n_patches],
                image_grid_thw=prompt["image_grid_thw"][q : q + 1],
                mm_token_type_ids=torch.cat([prompt["mm_token_type_ids"][q][keep],
                                             torch.zeros(n_answer, dtype=torch.int)])[None],
            )
        n_prompt = int(keep.sum())
        expected = full.logits[0, n_prompt - 1 : n_prompt - 1 + n_answer]
        torch.testing.assert_close(logits[row, :n_answer], expected, rtol=1e-4, atol=1e-4)
        # hidden at answer token i is the final-norm state that predicts answer token i + 1
        with torch.no_grad():
            from_hidden = model.lm_head(hidden[row, : n_answer - 1])
        torch.testing.assert_close(from_hidden, full.logits[0, n_prompt : n_prompt + n_answer - 1],
                                   rtol=1e-4, atol=1e-4)
    assert logits.shape[:2] == (len(records) * G, T) and hidden.shape[:2] == (len(records) * G, T)
    assert hidden.shape[2] == model.config.text_config.hidden_size and L > 0


def test_16bit_scan_keeps_its_gradient_through_build_inputs(tiny, image_records, tmp_path):
    """A 16-bit greyscale PNG (as exported from DICOM) reaches the vision tower as a gradient, not all white."""
    model, tokenizer, image_processor = tiny
    scan = tmp_path / "scan16.png"
    Image.fromarray(np.tile(np.linspace(2000, 14000, 56).astype(np.uint16), (56, 1))).save(scan)
    white = tmp_path / "white.png"
    Image.new("RGB", (56, 56), (255, 255, 255)).save(white)
    pixels = np.asarray(rollout.open_image(scan))  # the reader every stage uses, re-exported from data
    assert pixels[:, 0].max() == 0 and pixels[:, -1].min() == 255 and (np.diff(pixels[0, :, 0].astype(int)) >= 0).all()
    records = [dict(image_records[0], image=str(scan)), dict(image_records[0], image=str(white))]
    prompt = rollout.build_inputs(tokenizer, image_processor, records)
    per_image = prompt["pixel_values"].view(2, -1, prompt["pixel_values"].shape[-1])
    spread = (per_image - per_image[:, :1]).abs().amax(dim=(1, 2))  # how much the patches of one image differ
    assert spread[0] > 0.5 and spread[1] < 1e-6  # a gradient, and the flat white image it used to become
