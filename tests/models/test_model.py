"""The VG-LAW model: equivalences with reference implementations, independence, gradients."""
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vglaw
from vglaw.models.scratch import ConvStem
from vglaw.models.vitdet import ViTDet


def tiny(**overrides):
    torch.manual_seed(0)
    return vglaw.create_model("vglaw_tiny", **overrides).eval()


def tiny_scratch(**overrides):
    torch.manual_seed(0)
    return vglaw.create_model("vglaw_tiny_scratch", **overrides).eval()


def make_phi_nonzero(model, scale=0.5):
    with torch.no_grad():
        model.weight_generator.phi_weight.normal_(0, scale)
        model.weight_generator.phi_bias.normal_(0, scale)


def encode(tokenizer, texts, pad_to=None):
    kwargs = dict(padding="max_length", max_length=pad_to) if pad_to else dict(padding=True)
    t = tokenizer(texts, return_tensors="pt", truncation=True, **kwargs)
    return t["input_ids"], t["attention_mask"]


@pytest.fixture(scope="module")
def model():
    return tiny()


def test_output_contract(model, tokenizer):
    ids, mask = encode(tokenizer, ["the red circle", "a square"])
    out = model(torch.randn(2, 3, 64, 64), ids, mask, return_attention=True)
    assert out["boxes"].shape == (2, 4)
    assert ((out["boxes"] >= 0) & (out["boxes"] <= 1)).all()
    assert out["mask_logits"].shape == (2, 1, 64, 64)
    assert out["lang_attention"].shape == (2, 4, 12, ids.shape[1])
    # Attention never lands on padding tokens and sums to one over the real tokens.
    alpha = out["lang_attention"]
    assert torch.all(alpha[1, :, :, mask[1] == 0] == 0)
    torch.testing.assert_close(alpha.sum(-1), torch.ones_like(alpha.sum(-1)))


@pytest.mark.parametrize("task,keys", [("box", {"boxes"}), ("mask", {"mask_logits"})])
def test_single_task_variants(tokenizer, task, keys):
    m = tiny(task=task)
    ids, mask = encode(tokenizer, ["the red circle"])
    assert set(m(torch.randn(1, 3, 64, 64), ids, mask)) == keys
    assert (m.box_head is None) == (task == "mask") and (m.mask_head is None) == (task == "box")


def test_unknown_variant_and_task():
    with pytest.raises(ValueError, match="vglaw_tiny"):
        vglaw.create_model("vglaw_huge")
    with pytest.raises(ValueError, match="task"):
        vglaw.create_model("vglaw_tiny", task="caption")


def test_from_scratch_options_are_checked():
    with pytest.raises(ValueError, match="sentence must be one of"):
        tiny_scratch(sentence="max")
    with pytest.raises(ValueError, match="mask_skip needs a mask task"):
        tiny_scratch(task="box")
    with pytest.raises(ValueError, match="seg_classes must be 0 or >= 2"):
        tiny_scratch(seg_classes=1)
    with pytest.raises(ValueError, match="needs a mask task"):
        tiny_scratch(seg_classes=3, task="box", mask_skip=False)
    with pytest.raises(ValueError, match="divisible by 4"):
        ConvStem(patch_size=6, embed_dim=32)
    with pytest.raises(ValueError, match="stem_depth must be >= 0"):
        tiny_scratch(stem_depth=-1)
    with pytest.raises(ValueError, match="needs freeze_text=True"):
        tiny_scratch(freeze_text=False, text_cache_size=8)


def test_the_paper_model_takes_no_from_scratch_option():
    """The from-scratch parts live in `ScratchVGLAW`; the paper's class refuses them by name."""
    for option in ("stem_depth", "mask_skip", "seg_classes", "sentence", "freeze_text", "text_cache_size"):
        with pytest.raises(ValueError, match=f"takes no argument {option}"):
            vglaw.create_model("vglaw_tiny", **{option: 1})
    m = tiny()
    assert {n for n, _ in m.mask_head.named_parameters()} == {
        f"{layer}.{p}" for layer in ("up1", "norm", "up2") for p in ("weight", "bias")}
    assert {n.split(".")[0] for n, _ in m.box_head.named_parameters()} == {"visual_proj", "text_proj", "mlp"}
    assert type(m.backbone.patch_embed).__name__ == "PatchEmbed"


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_conv_stem_receptive_field_grows_by_8_pixels_per_stride_4_convolution(depth):
    stem = ConvStem(patch_size=16, in_chans=3, embed_dim=32, depth=depth).eval()
    image = torch.zeros(1, 3, 96, 96, requires_grad=True)
    s4 = stem.stride4(image)
    tokens = stem.embed(s4)
    assert tokens.shape == (1, 6, 6, 32) and s4.shape == (1, 8, 24, 24)
    torch.testing.assert_close(stem(image), tokens)
    s4[0, :, 12, 12].sum().backward()
    seen = (image.grad[0].abs().sum(0) > 0).nonzero()  # (n, 2) pixels that reach s4[12, 12]
    for axis in (0, 1):
        lo, hi = seen[:, axis].min().item(), seen[:, axis].max().item()
        assert hi - lo + 1 == 7 + 8 * depth
        assert lo <= 4 * 12 <= hi


def test_mean_pooled_sentence_feature_is_the_mean_of_real_tokens(tokenizer):
    """The from-scratch heads read the padding-free token mean, the paper's read `[CLS]`."""
    ids, mask = encode(tokenizer, ["the small red circle"], pad_to=12)
    n = int(mask.sum())
    for m, want in ((tiny_scratch(), lambda t: t[:, :n].mean(1)), (tiny(), lambda t: t[:, 0])):
        m.double()  # a masked mean against a sliced one: equal in exact arithmetic, so in float64
        seen = {}
        m.mask_head.register_forward_pre_hook(lambda module, args, seen=seen: seen.update(sentence=args[1]))
        with torch.no_grad():
            m(torch.randn(1, 3, 64, 64, dtype=torch.float64), ids, mask)
            tokens = m.text(ids, mask)
        assert tokens.dtype == torch.float64
        torch.testing.assert_close(seen["sentence"], want(tokens), atol=1e-12, rtol=1e-12)


def test_zero_phi_backbone_is_plain_vitdet(tokenizer):
    """At initialisation Φ = 0, so the language-adaptive backbone equals the static one (exactly;
    the two paths run different kernels, so compared in float64)."""
    model = tiny().double()
    ids, mask = encode(tokenizer, ["the red circle", "the big blue star left of the square"])
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        adaptive = model.forward_features(images, model.language_weights(ids, mask).qkv)
        static = model.forward_features(images, None)
    assert static.dtype == torch.float64
    torch.testing.assert_close(adaptive, static, atol=1e-12, rtol=1e-12)


def test_backbone_equals_timm_sam():
    """Same weights in timm's VisionTransformerSAM (neck removed): same features. The 80 px input
    gives a 5x5 grid, so the 2x2 windows need padding, which both must treat alike."""
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    torch.manual_seed(0)
    ours = ViTDet(img_size=80, embed_dim=48, depth=4, num_heads=2, window_size=2, window_block_indexes=(0, 2),
                  drop_path_rate=0.0).eval()
    with torch.no_grad():  # rel-pos tables start at zero; make them matter
        for name, p in ours.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, 0.5)
    ref = VisionTransformerSAM(img_size=80, patch_size=16, embed_dim=48, depth=4, num_heads=2, window_size=2,
                               global_attn_indexes=(1, 3), use_rel_pos=True, neck_chans=0, num_classes=0,
                               norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval()
    ref.neck = nn.Identity()
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("head", "neck", "norm", "fc_norm")) for k in missing)
    ours.double(), ref.double()  # two implementations of one function: compared in float64
    images = torch.randn(2, 3, 80, 80, dtype=torch.float64)
    with torch.no_grad():
        expected = ref.forward_features(images).permute(0, 2, 3, 1)  # (B, H, W, C)
        got = ours(images)
    assert got.dtype == expected.dtype == torch.float64
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


def test_factored_qkv_equals_materialised_weight(tokenizer):
    model = tiny()
    make_phi_nonzero(model)
    model.double()  # two ways to one product, equal in exact arithmetic: compared in float64
    ids, mask = encode(tokenizer, ["the red circle", "the star left of the blue circle"])
    with torch.no_grad():
        h1 = model.aggregator(model.text(ids, mask), mask)
        factors = model.weight_generator(h1)
        phi = model.weight_generator.phi(h1)  # (B, N, d_w, d_w)
        P, Q = model.weight_generator.P, model.weight_generator.Q
        block = 1
        qkv = model.backbone.blocks[block].attn.qkv
        x = torch.randn(2, 4, 4, qkv.in_features, dtype=torch.float64)
        fast = qkv(x, factors[block])
        W = qkv.weight + P @ phi[:, block] @ Q.T  # (B, 3C, C), built only here as the reference
        slow = torch.einsum("bhwc,boc->bhwo", x, W) + qkv.bias
        assert (W - qkv.weight).abs().amax() > 1e-3  # the update is not trivially zero
        assert fast.dtype == torch.float64
        torch.testing.assert_close(fast, slow, atol=1e-10, rtol=1e-10)


# The paper's model, and the from-scratch one (conv stem with a stride-4 convolution, stride-4
# skip into the mask head, mean-pooled sentence feature for the heads, per-pixel category
# classifier, frozen text encoder).
VARIANTS = {"paper": ("vglaw_tiny", {}), "from_scratch": ("vglaw_tiny_scratch", {"seg_classes": 3})}


def build(kind):
    name, options = VARIANTS[kind]
    torch.manual_seed(0)
    return vglaw.create_model(name, **options).eval()


@pytest.mark.parametrize("kind", list(VARIANTS))
def test_samples_are_independent_of_batch_and_padding(tokenizer, kind):
    # An exact property, but batch 1 vs 2 and padded vs unpadded run different BLAS kernels, whose
    # float32 results differ by ~1e-5 on mask logits of scale ~3 (and differently per CPU): checked
    # in float64, where they agree to ~1e-13.
    m = build(kind)
    make_phi_nonzero(m)
    m.double()
    texts = ["the small red circle", "the star left of the big blue square at the top"]
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        ids, mask = encode(tokenizer, texts)
        batch = m(images, ids, mask)
        ids2, mask2 = encode(tokenizer, texts, pad_to=ids.shape[1] + 7)
        padded = m(images, ids2, mask2)
        for i, text in enumerate(texts):
            solo_ids, solo_mask = encode(tokenizer, [text])
            solo = m(images[i : i + 1], solo_ids, solo_mask)
            for key in solo:
                assert solo[key].dtype == torch.float64
                torch.testing.assert_close(batch[key][i : i + 1], solo[key], atol=1e-10, rtol=1e-9)
                torch.testing.assert_close(padded[key][i : i + 1], solo[key], atol=1e-10, rtol=1e-9)
        # And the language does change the output once Φ is non-zero.
        swapped = m(images, ids.flip(0), mask.flip(0))
        assert (swapped["boxes"] - batch["boxes"]).abs().amax() > 1e-4


@pytest.mark.parametrize("kind", list(VARIANTS))
def test_every_parameter_gets_a_gradient(tokenizer, kind):
    m = build(kind)
    make_phi_nonzero(m, 0.1)
    m.train()
    ids, mask = encode(tokenizer, ["the red circle", "the blue square"])
    out = m(torch.randn(2, 3, 64, 64), ids, mask)
    assert ("seg_logits" in out) == (kind == "from_scratch")
    loss = out["boxes"].sum() + out["mask_logits"].sigmoid().mean()
    if "seg_logits" in out:
        assert out["seg_logits"].shape == (2, 3, 64, 64)
        loss = loss + out["seg_logits"].softmax(1)[:, 0].mean()
    loss.backward()
    frozen = kind == "from_scratch"  # its text encoder is fixed
    no_grad = [n for n, p in m.named_parameters()
               if (p.grad is None or p.grad.abs().sum() == 0) and not (frozen and n.startswith("text."))]
    assert no_grad == []


def test_zero_phi_blocks_gradient_to_language_path_only_through_phi(tokenizer):
    """With Φ at zero, P and Q get no gradient but Φ does, so training can start."""
    m = tiny().train()
    ids, mask = encode(tokenizer, ["the red circle"])
    out = m(torch.randn(1, 3, 64, 64), ids, mask)
    out["boxes"].sum().backward()
    wg = m.weight_generator
    assert wg.P.grad.abs().sum() == 0 and wg.Q.grad.abs().sum() == 0
    assert wg.phi_weight.grad.abs().sum() > 0


def test_frozen_text_encoder_gets_no_gradient_and_has_no_dropout(tokenizer):
    m = tiny_scratch().train()
    make_phi_nonzero(m, 0.1)
    ids, mask = encode(tokenizer, ["the red circle", "the blue square"])
    out = m(torch.randn(2, 3, 64, 64), ids, mask)
    (out["boxes"].sum() + out["mask_logits"].sigmoid().mean()).backward()
    assert not m.text.encoder.bert.training
    assert all(p.grad is None for p in m.text.parameters())
    assert m.aggregator.queries.grad.abs().sum() > 0
    torch.testing.assert_close(m.text(ids, mask), m.text(ids, mask), rtol=0, atol=0)


def test_text_cache_gives_the_uncached_model_output(tokenizer):
    texts = ["the small red circle", "the star left of the big blue square", "the red circle", "a square"]
    plain = tiny_scratch()
    cached = tiny_scratch(text_cache_size=3)
    cached.load_state_dict(plain.state_dict())
    make_phi_nonzero(plain)
    cached.weight_generator.load_state_dict(plain.weight_generator.state_dict())
    # A cache hit reuses a feature computed in another batch (other shapes, other BLAS kernels):
    # equal in exact arithmetic, so compared in float64.
    plain.double(), cached.double()
    images = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        ids, mask = encode(tokenizer, texts)
        want = plain(images, ids, mask)
        for order in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 1, 0, 3]):  # hits, misses, a duplicate, evictions
            got = cached(images[order], ids[order], mask[order])
            for key in ("boxes", "mask_logits"):
                assert got[key].dtype == torch.float64
                torch.testing.assert_close(got[key], want[key][order], atol=1e-10, rtol=1e-9)
        assert len(cached.text._cache) == 3
        # Loading weights drops every remembered feature: they belong to the old weights.
        cached.load_state_dict(plain.state_dict())
        assert len(cached.text._cache) == 0


@pytest.mark.parametrize("bias", [True, False])
def test_conv_transpose_as_matmul_equals_module(bias):
    from vglaw.models.heads import conv_transpose_2x2

    torch.manual_seed(0)
    # a matmul against the convolution module: compared in float64, where they agree to rounding
    conv = nn.ConvTranspose2d(6, 5, kernel_size=2, stride=2, bias=bias).double()
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64, requires_grad=True)  # (B, H, W, C)
    expected = conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, [x, conv.weight], grad)
    got = conv_transpose_2x2(x, conv)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    for g, e in zip(torch.autograd.grad(got, [x, conv.weight], grad), expected_grads):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-12)


def reference_scratch_mask_head(head, features, text_cls, out_size, skip=None):
    """The from-scratch mask head written out plainly: build the (B, C, 4H, 4W) map, then read it."""
    x = head.up1(features.permute(0, 3, 1, 2))  # (B, hidden, 2H, 2W)
    x = F.gelu(head.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
    x = head.up2(x).permute(0, 2, 3, 1)  # (B, 4H, 4W, C)
    if skip is not None:
        x = x + head.skip(skip.permute(0, 2, 3, 1))
    text = head.text_proj(text_cls)
    logits = torch.einsum("bhwc,bc->bhw", x, text).unsqueeze(1) / x.shape[-1] ** 0.5
    up = lambda t: F.interpolate(t, size=out_size, mode="bilinear", align_corners=False)
    return up(logits), (up(head.seg(x).permute(0, 3, 1, 2)) if head.seg is not None else None)


def reference_paper_mask_head(head, features, text_cls, out_size):
    """SPEC §1 written out: ConvT(C->256), LN, GELU, ConvT(256->d_l), s = F̂_v · F_l¹, bilinear."""
    x = head.up1(features.permute(0, 3, 1, 2))  # (B, 256, 2H, 2W)
    x = F.gelu(F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), head.norm.weight, head.norm.bias, 1e-6))
    x = head.up2(x.permute(0, 3, 1, 2))  # (B, d_l, 4H, 4W)
    logits = torch.einsum("bchw,bc->bhw", x, text_cls).unsqueeze(1)  # the raw [CLS] is the weight
    return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=True)


def assert_same_function(got, want, params):
    """Outputs and gradients of a head and its plain reference agree; callers run both in float64
    (different kernels, equal in exact arithmetic), hence the tight tolerances."""
    for g, w in zip(got, want):
        if w is not None:
            assert g.shape == w.shape and g.dtype == torch.float64
            torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)
    ramp = lambda o: torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)
    loss = lambda outs: sum((o * ramp(o)).sum() for o in outs if o is not None)
    for g, w in zip(torch.autograd.grad(loss(got), params), torch.autograd.grad(loss(want), params)):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


def test_paper_mask_head_is_the_raw_cls_readout_of_d_l_channels():
    from vglaw.models.heads import MaskHead

    torch.manual_seed(0)
    head = MaskHead(visual_dim=16, text_dim=10, hidden_dim=8)
    assert head.up2.out_channels == 10 and not hasattr(head, "text_proj")  # d_l channels, no projection
    for p in head.parameters():  # non-zero biases everywhere, so a dropped bias shows
        nn.init.normal_(p, std=0.3)
    head.double()  # exact identities, checked in float64
    features = torch.randn(2, 3, 4, 16, dtype=torch.float64, requires_grad=True)  # (B, H, W, C)
    text = torch.randn(2, 10, dtype=torch.float64, requires_grad=True)
    got = head(features, text, (24, 32))["mask_logits"]
    want = reference_paper_mask_head(head, features, text, (24, 32))
    assert got.shape == (2, 1, 24, 32)
    assert_same_function([got], [want], [features, text, *head.parameters()])
    # No hidden 1/sqrt(C): doubling the text feature doubles the logit above the bias term.
    zero = head(features, torch.zeros_like(text), (24, 32))["mask_logits"]
    twice = head(features, 2 * text, (24, 32))["mask_logits"]
    torch.testing.assert_close(twice - zero, 2 * (got - zero), atol=1e-10, rtol=1e-10)


def test_paper_lap_pools_the_raw_backbone_features():
    from vglaw.models.heads import LAPBoxHead

    torch.manual_seed(0)
    head = LAPBoxHead(visual_dim=16, text_dim=10, attn_dim=8).double()  # against einsums: in float64
    features, text = torch.randn(2, 3, 4, 16, dtype=torch.float64) * 5, torch.randn(2, 10, dtype=torch.float64)
    seen = {}
    head.mlp.register_forward_pre_hook(lambda module, args: seen.update(pooled=args[0]))
    out = head(features, text)
    boxes, attn = out["boxes"], out["lap_attention"]
    tokens = features.reshape(2, 12, 16)
    logits = torch.einsum("bnk,bk->bn", head.visual_proj(tokens), head.text_proj(text)) / 8 ** 0.5
    want = torch.einsum("bn,bnc->bc", logits.softmax(-1), tokens)  # Σ A·F_v, nothing normalised
    assert want.dtype == torch.float64
    torch.testing.assert_close(seen["pooled"], want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(attn.flatten(1), logits.softmax(-1), atol=1e-12, rtol=1e-12)
    assert boxes.shape == (2, 4) and not any(isinstance(m, nn.LayerNorm) for m in head.modules())


@pytest.mark.parametrize("skip_dim,seg_classes", [(0, 0), (6, 0), (0, 3), (6, 3)])
def test_scratch_mask_head_equals_the_plain_arithmetic(skip_dim, seg_classes):
    from vglaw.models.scratch import ScratchMaskHead

    torch.manual_seed(0)
    head = ScratchMaskHead(visual_dim=16, text_dim=10, hidden_dim=8, skip_dim=skip_dim, seg_classes=seg_classes)
    for p in head.parameters():  # non-zero biases everywhere, so a dropped bias shows
        nn.init.normal_(p, std=0.3)
    head.double()  # against the plain arithmetic: in float64
    features = torch.randn(2, 3, 4, 16, dtype=torch.float64, requires_grad=True)  # (B, H, W, C)
    text = torch.randn(2, 10, dtype=torch.float64)
    skip = torch.randn(2, skip_dim, 12, 16, dtype=torch.float64) if skip_dim else None
    out = head(features, text, (24, 32), skip)
    want = reference_scratch_mask_head(head, features, text, (24, 32), skip)
    assert ("seg_logits" in out) == (seg_classes > 0)
    got = (out["mask_logits"], out.get("seg_logits"))
    assert_same_function(got, want, [features, *head.parameters()])


def test_mask_heads_run_under_bf16_autocast():
    """The per-sample weight folding mixes bf16 activations with fp32 parameters; bf16 training
    (GPU) must not hit a dtype mismatch. CPU autocast exercises the same casting rules."""
    from vglaw.models.heads import MaskHead
    from vglaw.models.scratch import ScratchMaskHead

    torch.manual_seed(0)
    features = torch.randn(2, 3, 4, 16, requires_grad=True)
    text, skip = torch.randn(2, 10), torch.randn(2, 6, 12, 16)
    for head, args in ((ScratchMaskHead(16, 10, 8, skip_dim=6, seg_classes=5), (skip,)), (MaskHead(16, 10, 8), ())):
        want = head(features, text, (24, 32), *args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = head(features, text, (24, 32), *args)
        assert want.keys() == got.keys()
        want, got = list(want.values()), list(got.values())
        for g, w in zip(got, want):
            # bf16 against fp32: a few bf16 roundings (unit 2**-8) of the output's scale; the
            # outputs here err by 1.3-1.6 units, a wrong computation by O(scale).
            torch.testing.assert_close(g.float(), w, atol=8 * 2**-8 * w.abs().max().item(), rtol=0)
        sum(g.float().sum() for g in got).backward()
        assert features.grad is not None and torch.isfinite(features.grad).all()
