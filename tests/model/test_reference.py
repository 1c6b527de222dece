"""The reference DPT against properties of CLIP and of the method (docs/DESIGN.md §1).

These are invariants with an independent way to compute the expected value (open_clip's own
encoders, a hand-written attention with prompt keys, the objective written out slot by slot),
not a second transcription of the model code.
"""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from dpt_fast.config import DPTConfig
from dpt_fast.output import DPTOutput
from dpt_fast.reference import DPT

METHOD_PARTS = {
    "coop": {"text_prompts"},
    "vpt": {"visual_prompts"},
    "vlp": {"text_prompts", "visual_prompts"},
    "dpt": {"text_prompts", "visual_prompts", "cavpt"},
}


def _build(clip, classnames, **kw) -> DPT:
    return DPT(clip, classnames, DPTConfig(**kw))


def test_frozen_image_feature_is_open_clip_encode_image(tiny_clip_model, classnames, images):
    model = _build(tiny_clip_model, classnames)
    expected = tiny_clip_model.encode_image(images)
    torch.testing.assert_close(model.encode_image_frozen(images), expected, rtol=0, atol=0)


def test_handcrafted_features_are_open_clip_encode_text(tiny_clip_model, classnames):
    template = "a blurry photo of the {}."
    model = _build(tiny_clip_model, classnames, template=template)
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    texts = [template.format(c.replace("_", " ")) for c in classnames]
    expected = F.normalize(tiny_clip_model.encode_text(tokenizer(texts)), dim=-1)
    torch.testing.assert_close(model.handcrafted_text_features, expected, rtol=1e-5, atol=1e-6)


def test_coop_prompted_image_feature_is_encode_image(tiny_clip_model, classnames, images):
    model = _build(tiny_clip_model, classnames, method="coop")
    image, layer_logits = model.encode_image_prompted(images, None)
    assert layer_logits is None
    torch.testing.assert_close(image, tiny_clip_model.encode_image(images), rtol=0, atol=0)


def test_text_ctx_init_from_template_words_reproduces_template_features(tiny_clip_model,
                                                                         classnames):
    # Context initialised from "a photo of a" makes prompt c exactly "a photo of a <name>.":
    # before training, the learned text features are CLIP's features of the template.
    model = _build(tiny_clip_model, classnames, method="coop", text_ctx_init="a photo of a")
    assert model.text_prompts.n_ctx == 4
    learned = F.normalize(model.encode_learned_text(), dim=-1)
    torch.testing.assert_close(learned, model.handcrafted_text_features, rtol=1e-5, atol=1e-5)


def _block_with_prompt_kv(block, x, prompts):
    """One open_clip residual block where the image tokens also attend to prompt tokens.

    Written with explicit q/k/v projections: prompts contribute keys and values only, which is
    what appending them to the sequence and dropping their outputs amounts to.
    """
    attn = block.attn
    heads, width = attn.num_heads, x.shape[-1]
    d = width // heads
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
    h = block.ln_1(x)
    hp = block.ln_1(prompts)
    kv_in = torch.cat([h, hp], dim=1)

    def split(t):
        return t.view(t.shape[0], t.shape[1], heads, d).transpose(1, 2)

    q, k, v = split(F.linear(h, w_q, b_q)), split(F.linear(kv_in, w_k, b_k)), \
        split(F.linear(kv_in, w_v, b_v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(x.shape)
    x = x + block.ls_1(attn.out_proj(out))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def test_deep_visual_prompts_act_as_extra_keys_and_values(tiny_clip_model, classnames, images):
    model = _build(tiny_clip_model, classnames, method="vpt")
    visual = tiny_clip_model.visual
    with torch.no_grad():
        model.visual_prompts.ctx.normal_(std=0.5)  # large enough to matter
        x = visual.ln_pre(
            torch.cat([visual.class_embedding.expand(images.shape[0], 1, -1),
                       visual.conv1(images).flatten(2).transpose(1, 2)], dim=1)
            + visual.positional_embedding
        )
        for i, block in enumerate(visual.transformer.resblocks):
            prompts = model.visual_prompts.ctx[i].expand(images.shape[0], -1, -1)
            x = _block_with_prompt_kv(block, x, prompts)
        expected = visual.ln_post(x[:, 0]) @ visual.proj
        image, _ = model.encode_image_prompted(images, None)
    torch.testing.assert_close(image, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(image, tiny_clip_model.encode_image(images), atol=1e-3)


@pytest.mark.parametrize("method", ["coop", "vpt", "vlp", "dpt"])
def test_output_fields_per_method(tiny_clip_model, classnames, images, method):
    model = _build(tiny_clip_model, classnames, method=method, cavpt_top_k=3)
    out = model(images)
    b, c = images.shape[0], len(classnames)
    assert isinstance(out, DPTOutput)
    assert out.logits.shape == (b, c)
    guided = method in ("vlp", "dpt")
    assert (out.logits_zeroshot_image is not None) == guided
    assert (out.logits_handcrafted_text is not None) == guided
    if method == "dpt":
        assert out.layer_logits.shape == (b, 1, 3, c)
        assert out.topk_indices.shape == (b, 3)
    else:
        assert out.layer_logits is None and out.topk_indices is None
    for field in ("logits", "logits_zeroshot_image", "logits_handcrafted_text", "layer_logits"):
        value = getattr(out, field)
        assert value is None or torch.isfinite(value).all()


@pytest.mark.parametrize("method", ["coop", "vpt", "vlp", "dpt"])
def test_each_method_trains_exactly_its_parts_and_clip_stays_frozen(
        tiny_clip_model, classnames, images, labels, method):
    model = _build(tiny_clip_model, classnames, method=method, cavpt_start_layer=None
                   if method != "dpt" else 2)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == METHOD_PARTS[method]
    assert set(model.parameter_groups()) == METHOD_PARTS[method]
    assert not any(p.requires_grad for p in tiny_clip_model.parameters())
    model.train()
    assert not tiny_clip_model.training
    model.loss(model(images), labels, epoch=0).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            if "classifier" not in name:  # classifiers only learn from label hits
                assert p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_vpt_classifies_with_handcrafted_text(tiny_clip_model, classnames, images):
    model = _build(tiny_clip_model, classnames, method="vpt")
    out = model(images)
    image, _ = model.encode_image_prompted(images, None)
    expected = tiny_clip_model.logit_scale.exp() * F.normalize(image, dim=-1) \
        @ model.handcrafted_text_features.t()
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)


def test_deep_prompt_and_cavpt_layer_counts(tiny_clip_model, classnames):
    layers = len(tiny_clip_model.visual.transformer.resblocks)
    default = _build(tiny_clip_model, classnames)  # CAVPT in the last layer only
    assert default.visual_prompts.n_layers == layers - 1 and len(default.cavpt.layers) == 1
    everywhere = _build(tiny_clip_model, classnames, cavpt_start_layer=1)
    assert everywhere.visual_prompts is None and len(everywhere.cavpt.layers) == layers
    vlp = _build(tiny_clip_model, classnames, method="vlp")
    assert vlp.visual_prompts.n_layers == layers and vlp.cavpt is None
    with pytest.raises(ValueError, match="cavpt_start_layer=4"):
        _build(tiny_clip_model, classnames, cavpt_start_layer=layers + 1)


def test_topk_selection_follows_zero_shot_ranking(tiny_clip_model, classnames, images):
    model = _build(tiny_clip_model, classnames, cavpt_top_k=4)
    out = model(images)
    zero_shot = F.normalize(tiny_clip_model.encode_image(images), dim=-1) \
        @ model.handcrafted_text_features.t()
    expected = zero_shot.argsort(dim=-1, descending=True)[:, :4]
    assert torch.equal(out.topk_indices, expected)


def test_top_k_is_capped_at_the_number_of_classes(tiny_clip_model, images):
    model = _build(tiny_clip_model, ["cat", "dog", "bird"], cavpt_top_k=10)
    out = model(images)
    assert out.layer_logits.shape == (4, 1, 3, 3)
    assert sorted(out.topk_indices[0].tolist()) == [0, 1, 2]
    single = _build(tiny_clip_model, ["cat"])
    assert single(images).logits.shape == (4, 1)


def test_cavpt_layer_matches_the_method_description(tiny_clip_model, classnames, images):
    # docs/DESIGN.md §1, CAVPT steps 3-5, computed per image with explicit loops over slots.
    model = _build(tiny_clip_model, classnames, cavpt_top_k=3)
    layer = model.cavpt.layers[0]
    tokens = torch.randn(2, 17, 64)
    class_text = torch.randn(2, 3, 24)
    prompts, logits = layer(tokens, class_text)
    for b in range(2):
        kv = torch.cat([tokens[b], layer.ctx])  # (17 + 10, W)
        for j in range(3):
            query = layer.query_proj(class_text[b, j])
            scores = (layer.attn_q(query) @ layer.attn_k(kv).t()) / math.sqrt(32)
            out = layer.attn_v(torch.softmax(scores, dim=-1) @ kv)
            torch.testing.assert_close(logits[b, j], layer.classifier(layer.norm_logits(out)))
            torch.testing.assert_close(prompts[b, j], layer.norm_prompt(out + query))


def test_cavpt_does_not_backpropagate_into_image_tokens():
    from dpt_fast.prompts import ClassAwarePromptLayer

    layer = ClassAwarePromptLayer(8, 16, 5, DPTConfig(), torch.device("cpu"), torch.float32)
    tokens = torch.randn(2, 6, 16, requires_grad=True)
    prompts, logits = layer(tokens, torch.randn(2, 3, 8))
    (prompts.sum() + logits.sum()).backward()
    assert tokens.grad is None


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_class_token_positions_lay_out_tokens(tiny_clip_model, position):
    model = _build(tiny_clip_model, ["sea_lion", "cat"], method="coop", n_text_ctx=4,
                   class_token_position=position)
    prompts = model.text_prompts()  # (2, 77, D)
    embed = tiny_clip_model.token_embedding.weight
    ctx = model.text_prompts.ctx
    from dpt_fast.tokenizer import ClipTokenizer

    tok = ClipTokenizer()
    name = tok.encode("sea lion")  # 2 tokens
    tail = [*tok.encode("."), tok.eot_id]
    layouts = {
        "end": [("sot",), ("ctx", 0, 4), ("ids", name), ("ids", tail)],
        "middle": [("sot",), ("ctx", 0, 2), ("ids", name), ("ctx", 2, 4), ("ids", tail)],
        "front": [("sot",), ("ids", name), ("ctx", 0, 4), ("ids", tail)],
    }
    pieces = []
    for part in layouts[position]:
        if part[0] == "sot":
            pieces.append(embed[[tok.sot_id]])
        elif part[0] == "ctx":
            pieces.append(ctx[part[1]:part[2]])
        else:
            pieces.append(embed[part[1]])
    expected = torch.cat(pieces)
    torch.testing.assert_close(prompts[0, : expected.shape[0]], expected)
    # EOT position is the same in every layout, and is what pooling reads
    assert model.text_prompts.eot_index[0].item() == expected.shape[0] - 1


def test_class_specific_context(tiny_clip_model, classnames, images, labels):
    model = _build(tiny_clip_model, classnames, method="coop", class_specific_ctx=True,
                   n_text_ctx=3)
    assert model.text_prompts.ctx.shape == (len(classnames), 3, 32)
    model.loss(model(images), labels, epoch=0).backward()
    assert model.text_prompts.ctx.grad.abs().sum(dim=(1, 2)).gt(0).all()


# ------------------------------------------------------------------------------------- loss
def _layer_term_by_slots(out: DPTOutput, labels: torch.Tensor) -> torch.Tensor | None:
    rows, targets = [], []
    b, n_layers, k, _ = out.layer_logits.shape
    for i in range(b):
        for layer in range(n_layers):
            for j in range(k):
                if out.topk_indices[i, j] == labels[i]:
                    rows.append(out.layer_logits[i, layer, j])
                    targets.append(labels[i])
    if not rows:
        return None
    return F.cross_entropy(torch.stack(rows), torch.stack(targets))


def _random_output(b=6, c=5, n_layers=2, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    topk = torch.stack([torch.randperm(c, generator=g)[:k] for _ in range(b)])
    return DPTOutput(
        logits=torch.randn(b, c, generator=g),
        layer_logits=torch.randn(b, n_layers, k, c, generator=g),
        topk_indices=topk,
        logits_zeroshot_image=torch.randn(b, c, generator=g),
        logits_handcrafted_text=torch.randn(b, c, generator=g),
    )


@pytest.mark.parametrize("epoch", [0, 29, 30, 31])
def test_dpt_objective_guidance_and_layer_term(tiny_clip_model, classnames, epoch):
    model = _build(tiny_clip_model, classnames, alpha=0.3, guidance_epochs=30)
    out = _random_output()
    labels = out.topk_indices[:, 0].clone()
    labels[::2] = (labels[::2] + 1) % 5  # some slots hit, some do not
    ce = F.cross_entropy
    if epoch < 30:
        expected = ce(out.logits_zeroshot_image, labels) + ce(out.logits_handcrafted_text, labels) \
            + 0.1 * ce(out.logits, labels)
    else:
        expected = ce(out.logits, labels)
    term = _layer_term_by_slots(out, labels)
    assert term is not None
    expected = expected + 0.3 * term
    torch.testing.assert_close(model.loss(out, labels, epoch), expected)


def test_layer_term_is_skipped_without_hits(tiny_clip_model, classnames):
    model = _build(tiny_clip_model, classnames)
    out = _random_output(c=7, k=2)
    labels = torch.tensor([next(c for c in range(7) if c not in row) for row in
                           out.topk_indices.tolist()])
    assert _layer_term_by_slots(out, labels) is None
    expected = F.cross_entropy(out.logits, labels) + 0.1 * 0  # epoch 40: plain CE
    torch.testing.assert_close(model.loss(out, labels, epoch=40), expected)


def test_methods_without_guidance_use_plain_ce(tiny_clip_model, classnames):
    out = DPTOutput(logits=torch.randn(3, 7))
    labels = torch.tensor([1, 0, 6])
    for method in ("coop", "vpt"):
        model = _build(tiny_clip_model, classnames, method=method)
        torch.testing.assert_close(model.loss(out, labels, epoch=0),
                                   F.cross_entropy(out.logits, labels))


def test_loss_rejects_bad_labels(tiny_clip_model, classnames):
    model = _build(tiny_clip_model, classnames, method="coop")
    out = DPTOutput(logits=torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        model.loss(out, torch.tensor([1, 2]), 0)
    with pytest.raises(ValueError, match=r"\[0, 7\)"):
        model.loss(out, torch.tensor([1, 2, 7]), 0)
    with pytest.raises(ValueError, match="integer"):
        model.loss(out, torch.tensor([1.0, 2.0, 3.0]), 0)


# ------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise_clear_errors(tiny_clip_model, classnames):
    model = _build(tiny_clip_model, classnames, method="coop")
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\).*got \(2, 3, 64, 64\)"):
        model(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="float"):
        model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="classnames is empty"):
        DPT(tiny_clip_model, [])
    with pytest.raises(ValueError, match="same prompt"):
        DPT(tiny_clip_model, ["sea_lion", "sea lion"])
    with pytest.raises(TypeError, match="list of strings"):
        DPT(tiny_clip_model, "cat")
    with pytest.raises(ValueError, match="too long"):
        DPT(tiny_clip_model, ["very " * 60 + "long name"])
    with pytest.raises(ValueError, match="single tokens"):
        _build(tiny_clip_model, classnames, text_ctx_init="photograph of an unbelievablyweird")


def test_unsupported_clip_is_refused():
    model = open_clip.create_model("RN50", pretrained=None)
    with pytest.raises(TypeError, match="ViT image tower"):
        DPT(model, ["cat"])


def test_prompts_follow_clip_device_and_float64(classnames, images, labels):
    from dpt_fast.testing import tiny_clip

    clip = tiny_clip().double()
    model = _build(clip, classnames)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    out = model(images.double())
    assert out.logits.dtype == torch.float64
    model.loss(out, labels, 0).backward()


def test_cpu_autocast_bfloat16_runs(tiny_clip_model, classnames, images, labels):
    model = _build(tiny_clip_model, classnames)
    reference = model(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
        loss = model.loss(out, labels, 0)
    loss.backward()
    assert torch.isfinite(out.logits).all()
    # bf16 keeps ~3 significant digits; logits are O(10) with scale 1/0.07
    torch.testing.assert_close(out.logits.float(), reference.logits, rtol=0.05, atol=0.5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast(classnames, labels, dtype):
    from dpt_fast.testing import tiny_clip

    clip = tiny_clip().cuda()
    model = _build(clip, classnames)
    assert all(p.device.type == "cuda" for p in model.parameters())
    images = torch.randn(4, 3, 32, 32, device="cuda")
    reference = model(images)
    with torch.autocast("cuda", dtype=dtype):
        out = model(images)
        loss = model.loss(out, labels.cuda(), 0)
    loss.backward()
    torch.testing.assert_close(out.logits.float(), reference.logits, rtol=0.05, atol=0.5)


@pytest.mark.slow
def test_vit_b16_shaped_training_step():
    from dpt_fast.testing import vit_b16_clip

    clip = vit_b16_clip()
    names = [f"class {i}" for i in range(12)]
    model = DPT(clip, names, DPTConfig(cavpt_start_layer=11))
    images = torch.randn(2, 3, 224, 224)
    out = model(images)
    assert out.logits.shape == (2, 12) and out.layer_logits.shape == (2, 2, 10, 12)
    model.loss(out, torch.tensor([0, 5]), epoch=0).backward()
    assert model.visual_prompts.ctx.shape == (10, 10, 768)
    assert model.visual_prompts.ctx.grad.abs().sum() > 0
    assert model.text_prompts.ctx.grad.abs().sum() > 0
