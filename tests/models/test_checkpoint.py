"""Pretrained visual weights: each source format, written here in that format, loads strictly."""
import pickle

import pytest
import torch

from vglaw.io.safe_pickle import UnsafePickleError, plain_load
from vglaw.models.checkpoint import load_visual_weights
from vglaw.models.geometry import crop_rel_pos, fit_rel_pos, resize_abs_pos, resize_rel_pos
from vglaw.models.vitdet import ViTDet

KW = dict(embed_dim=32, depth=2, num_heads=2, window_size=2, window_block_indexes=(0,), drop_path_rate=0.0)


def source_backbone(img_size):
    """A backbone at the checkpoint's own resolution, with every table non-trivial."""
    torch.manual_seed(1)
    m = ViTDet(img_size=img_size, **KW)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    return m


def target_backbone():
    torch.manual_seed(2)
    return ViTDet(img_size=64, **KW)  # 4x4 grid; global table of length 7


def check_loaded(target, source_sd, skip=()):
    for k, v in target.state_dict().items():
        if k == "pos_embed" or "rel_pos" in k or k in skip:
            continue
        torch.testing.assert_close(v, source_sd[k], msg=k)


def detectron2_pkl(tmp_path, src):
    sd = src.state_dict()
    pos_with_cls = torch.cat([torch.randn(1, 1, sd["pos_embed"].shape[-1]), sd["pos_embed"].flatten(1, 2)], dim=1)
    model = {"backbone.net." + k: v.numpy() for k, v in sd.items() if k != "pos_embed"}
    model["backbone.net.pos_embed"] = pos_with_cls.numpy()
    model["backbone.simfp_2.0.weight"] = torch.randn(3, 3).numpy()
    model["roi_heads.box_predictor.cls_score.weight"] = torch.randn(81, 4).numpy()
    path = tmp_path / "model_final.pkl"
    path.write_bytes(pickle.dumps({"model": model, "__author__": "test", "matching_heuristics": True}))
    return path


@pytest.mark.parametrize("mode", ["crop", "interpolate"])
def test_detectron2_pkl(tmp_path, mode):
    src = source_backbone(128)  # 8x8 grid, global table 15 -> 7
    sd = src.state_dict()
    path = detectron2_pkl(tmp_path, src)
    target = target_backbone()
    assert load_visual_weights(target, path, log=None, rel_pos=mode) == "detectron2"
    check_loaded(target, sd)
    tsd = target.state_dict()
    torch.testing.assert_close(tsd["pos_embed"], resize_abs_pos(sd["pos_embed"], (4, 4)))
    fit = crop_rel_pos if mode == "crop" else resize_rel_pos
    for axis in "hw":
        torch.testing.assert_close(tsd[f"blocks.1.attn.rel_pos_{axis}"], fit(sd[f"blocks.1.attn.rel_pos_{axis}"], 7))
    torch.testing.assert_close(tsd["blocks.0.attn.rel_pos_h"], sd["blocks.0.attn.rel_pos_h"])  # window table kept


def test_rel_pos_crop_keeps_the_central_offsets():
    """ViTDet-B at 1024 px has global tables of 127 rows (offsets -63..63); at 448 px (a 28-token
    grid) the paper keeps offsets -27..27 unchanged: rows 36..90, as `[36:-36]` in the official code."""
    table = torch.arange(127, dtype=torch.float32)[:, None].repeat(1, 64)  # row i holds i
    cropped = fit_rel_pos(table, 55)
    assert cropped.shape == (55, 64)
    assert cropped[:, 0].tolist() == list(range(36, 91))
    assert cropped[27, 0] == 63  # offset 0 stays offset 0
    interpolated = fit_rel_pos(table, 55, mode="interpolate")
    assert interpolated[0, 0] != 36 and interpolated[27, 0] == pytest.approx(63.0)
    # Shorter tables and odd differences can only be interpolated.
    torch.testing.assert_close(fit_rel_pos(table[:27], 55), resize_rel_pos(table[:27], 55))
    torch.testing.assert_close(fit_rel_pos(table, 54), resize_rel_pos(table, 54))
    with pytest.raises(ValueError, match="cannot centre-crop"):
        crop_rel_pos(table, 54)
    with pytest.raises(ValueError, match="'crop' or 'interpolate'"):
        fit_rel_pos(table, 55, mode="nearest")


def test_vitdet_b_1024_checkpoint_loads_strictly_into_the_paper_model(tmp_path):
    """A checkpoint with detectron2 ViTDet-B's exact keys and shapes (1024-px tables) loads into
    `vglaw_vitb`'s backbone, global tables cropped 127 -> 55."""
    src = ViTDet(img_size=1024, drop_path_rate=0.0)  # ViTDet-B as detectron2 trains it for COCO
    with torch.no_grad():
        for name, p in src.named_parameters():
            if "rel_pos" in name:
                p.normal_()
    path = detectron2_pkl(tmp_path, src)
    target = ViTDet(img_size=448)
    assert load_visual_weights(target, path, log=None) == "detectron2"
    sd, tsd = src.state_dict(), target.state_dict()
    assert sd["blocks.2.attn.rel_pos_h"].shape == (127, 64) and tsd["blocks.2.attn.rel_pos_h"].shape == (55, 64)
    torch.testing.assert_close(tsd["blocks.2.attn.rel_pos_w"], sd["blocks.2.attn.rel_pos_w"][36:91])
    torch.testing.assert_close(tsd["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])


def test_mae_pth_leaves_only_rel_pos_missing(tmp_path, capsys):
    src = source_backbone(64)
    sd = {k: v for k, v in src.state_dict().items() if "rel_pos" not in k}
    sd["pos_embed"] = torch.cat([torch.zeros(1, 1, 32), sd["pos_embed"].reshape(1, 16, 32)], dim=1)
    sd.update({"cls_token": torch.randn(1, 1, 32), "norm.weight": torch.ones(32), "norm.bias": torch.zeros(32)})
    path = tmp_path / "mae_pretrain_vit_base.pth"
    torch.save({"model": sd}, path)
    target = target_backbone()
    assert load_visual_weights(target, path) == "mae"
    assert "4 keys left at initialisation" in capsys.readouterr().out
    check_loaded(target, src.state_dict())
    torch.testing.assert_close(target.state_dict()["pos_embed"], src.state_dict()["pos_embed"])


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_sam(tmp_path, suffix):
    src = source_backbone(128)
    sd = dict(src.state_dict())
    sd["neck.0.weight"] = torch.randn(8, 32, 1, 1)
    path = tmp_path / f"samvit_base_patch16{suffix}"
    if suffix == ".pth":
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    target = target_backbone()
    assert load_visual_weights(target, path, log=None) == "sam"
    check_loaded(target, sd)
    torch.testing.assert_close(target.state_dict()["pos_embed"], resize_abs_pos(sd["pos_embed"], (4, 4)))


def test_wrong_shape_and_unknown_key_are_named(tmp_path):
    sd = dict(source_backbone(64).state_dict())
    sd["blocks.0.mlp.fc1.weight"] = torch.randn(7, 32)
    sd["blocks.0.attn.gate"] = torch.randn(3)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError) as err:
        load_visual_weights(target_backbone(), path, log=None)
    msg = str(err.value)
    assert "shape mismatch for blocks.0.mlp.fc1.weight: checkpoint (7, 32), model (128, 32)" in msg
    assert "unexpected key blocks.0.attn.gate" in msg and "bad.pth" in msg


def test_missing_key_is_named(tmp_path):
    sd = dict(source_backbone(64).state_dict())
    del sd["blocks.1.norm2.bias"]
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"missing key blocks\.1\.norm2\.bias"):
        load_visual_weights(target_backbone(), path, log=None)


def test_unrecognised_format_and_missing_file(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.randn(2)}, path)
    with pytest.raises(ValueError, match="unrecognised visual checkpoint"):
        load_visual_weights(target_backbone(), path, log=None)
    with pytest.raises(FileNotFoundError, match="nope.pkl"):
        load_visual_weights(target_backbone(), tmp_path / "nope.pkl", log=None)


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_malicious_pickle_is_refused_without_side_effects(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "model_final.pkl"
    path.write_bytes(pickle.dumps({"model": {"x": _Exploit()}}))
    with pytest.raises(UnsafePickleError, match="os.system|posix.system"):
        plain_load(path, allow_numpy=True)
    with pytest.raises(UnsafePickleError):
        load_visual_weights(target_backbone(), path, log=None)
    assert not (tmp_path / "pwned").exists()


def test_create_model_with_visual_weights(tmp_path):
    import vglaw

    torch.manual_seed(0)
    ref = vglaw.create_model("vglaw_tiny")
    sd = {k: v + 1.0 for k, v in ref.backbone.state_dict().items()}
    path = tmp_path / "w.pth"
    torch.save(sd, path)  # a 4-D pos_embed: read as a SAM-style state dict
    m = vglaw.create_model("vglaw_tiny", visual_weights=str(path))
    torch.testing.assert_close(m.backbone.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])
