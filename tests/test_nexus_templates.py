"""Nexus-Gen chat templates, slot bookkeeping and config presets (host side, no model)."""

import numpy as np
import pytest

from configs import nexus_gen
from nexus_jax.nexus import templates as T
from nexus_jax.nexus.slots import slot_index
from nexus_jax.nexus.tiny import ByteTokenizer

TOK = ByteTokenizer()
IDS = TOK.tokens


def test_generation_prompt_renders_exactly_as_nexus_gen_sees_it():
    # nexus-gen.md 1.6: the V2 EN generation prompt with the default system message.
    want = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nGenerate an image according "
        "to the following description: a red fox<|im_end|>\n<|im_start|>assistant\n"
    )
    assert T.render_chat(T.generation_messages("a red fox", with_answer=False), add_generation_prompt=True) == want
    zh = T.render_chat(T.generation_messages("一只狐狸", "zh"))
    assert "根据以下描述生成一张图像：一只狐狸" in zh and "这是根据您的描述生成的图像：<|vision_start|>" in zh


def test_editing_and_understanding_messages():
    edit = T.editing_messages("make it snow")
    assert edit[0].content == "<image> make it snow" and edit[1].content == "Here is the image: <image>"
    assert T.editing_messages("turn <image> blue")[0].content == "turn <image> blue"  # tag kept where the user put it
    assert T.editing_messages("x", "zh")[1].content == "以下为编辑后的图像：<image>"
    with pytest.raises(ValueError, match="exactly one <image> tag, got 2"):
        T.editing_messages("<image> and <image>")
    assert T.understanding_messages()[0].content == "<image>\nPlease give a brief description of the image."
    with pytest.raises(ValueError, match="language must be one of"):
        T.generation_messages("x", "fr")


def test_encode_chat_layout_and_labels():
    msgs = T.editing_messages("add a hat")
    chat = T.encode_chat(msgs, TOK.encode, IDS, input_image_tokens=[6], num_slots=4)
    text = TOK.decode(chat.input_ids)
    before, between, after = T.render_chat(msgs).split("<|image_pad|>")  # source image, then output image
    expanded = before + "<|image_pad|>" * 6 + between + "<|image_pad|>" * 4 + after
    assert text == expanded.rstrip("\n")  # training sequences end at the final <|im_end|>
    (inp, out) = chat.images
    assert (inp.length, inp.role, out.length, out.role) == (6, "user", 4, "assistant")
    assert (chat.input_ids[inp.start : inp.start + 6] == IDS.image_pad).all()
    assert (chat.labels[inp.start : inp.start + 6] == -100).all()  # user image: never a target
    assert (chat.labels[out.start : out.start + 4] == IDS.image_pad).all()  # output slots carry the image label
    trained = TOK.decode(chat.input_ids[chat.labels != -100])
    assert trained == "Here is the image: <|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|><|im_end|>"
    cut = T.encode_chat(msgs, TOK.encode, IDS, input_image_tokens=[6], num_slots=4, stop_after_slots=True)
    assert len(cut.input_ids) == out.start + 4 and cut.input_ids[-1] == IDS.image_pad
    with pytest.raises(ValueError, match="1 input <image> tags but 0 input images"):
        T.encode_chat(msgs, TOK.encode, IDS, num_slots=4)


def test_pad_batch_and_slot_index():
    chats = [T.encode_chat(T.generation_messages(p), TOK.encode, IDS, num_slots=3) for p in ("a", "a longer one")]
    batch = T.pad_batch(chats, IDS.endoftext)
    assert batch.input_ids.shape == (2, max(batch.lengths)) and not batch.attention_mask[0, 0]
    idx = slot_index(batch.labels, IDS.image_pad, 3)
    assert [list(r[r >= 0]) for r in idx] == [[0, 1, 2], [0, 1, 2]]
    bad = batch.labels.copy()
    bad[0, np.flatnonzero(bad[0] == IDS.image_pad)[0]] = 5
    with pytest.raises(ValueError, match="has 2 slots; .*exactly num_slots=3"):
        slot_index(bad, IDS.image_pad, 3)
    with pytest.raises(ValueError, match="more than the padded length 4"):
        T.pad_batch(chats, IDS.endoftext, length=4)


def test_config_presets_and_validation():
    v1, v2 = nexus_gen.nexus_gen_v1(), nexus_gen.nexus_gen_v2()
    assert (v1.token_loss_weight, v1.image_loss_weight, v1.uses_prefill_embeds) == (0.1, 1.0, False)
    assert (v2.token_loss_weight, v2.image_loss_weight, v2.uses_prefill_embeds) == (3.0, 3.0, True)
    assert v2.num_slots == 81 and v2.target_image_size == (252, 252) and v2.merged_slot_grid == (9, 9)
    assert v2.hidden_size == 3584 and not v2.trainable.vision_tower and v2.trainable.llm
    with pytest.raises(ValueError, match=r"num_slots=80 but slot_grid_thw \(1, 18, 18\) gives .* = 81"):
        v2.replace(num_slots=80)
    with pytest.raises(ValueError, match="version must be one of"):
        v2.replace(version="v3")
    with pytest.raises(ValueError, match="multiples of the spatial merge size 2"):
        v2.replace(slot_grid_thw=(1, 17, 18))
    with pytest.raises(ValueError, match="max_length=50 cannot hold 81 slots"):
        v2.replace(max_length=50)
