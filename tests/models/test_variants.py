"""Every named variant (`vglaw.list_models()`): it builds, answers with its output contract, and
comes back from its model folder as the same class with the same outputs."""
import pytest
import torch

import vglaw
from vglaw.errors import UsageError
from vglaw.models.loading import VARIANTS, is_generalised, variant_config

# ViT-B + a 6-layer BERT: seconds to build and write (make test-all)
LARGE = {"vglaw_vitb", "vglaw_vitb_gref", "vglaw_vitb_describe"}


def small_side(name: str) -> int:
    """The smallest input side the variant's windows tile: patch x window (x 2 for global blocks)."""
    args = VARIANTS[name][1]
    return args["patch_size"] * max(args["window_size"], 1) * 2


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in LARGE else n
                                  for n in vglaw.list_models()])
def test_every_variant_answers_and_round_trips_through_its_model_folder(name, tokenizer, tmp_path):
    torch.manual_seed(0)
    size = small_side(name)
    # random text weights too: a folder must keep them (not swap in the packaged MiniLM)
    model = vglaw.create_model(name, img_size=size, text_pretrained=False).eval()
    with torch.no_grad():  # a live language update, so the generated weights are exercised
        model.weight_generator.phi_weight.normal_(0, 0.5)
    t = tokenizer(["the red circle", "the star left of the blue square"], padding=True, return_tensors="pt")
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = model(images, t["input_ids"], t["attention_mask"])
    assert "mask_logits" in out and out["mask_logits"].shape == (2, 1, size, size)
    assert ("centre_logits" in out) == is_generalised(name)
    if "boxes" in out:
        assert out["boxes"].shape == (2, 4) and ((0 <= out["boxes"]) & (out["boxes"] <= 1)).all()
    assert all(torch.isfinite(v).all() for v in out.values() if v.is_floating_point())
    model.save_pretrained(tmp_path / name)
    again = type(model).from_pretrained(tmp_path / name)
    assert type(again) is type(model) and again.img_size == size
    assert again.config == model.config and type(model.config) is type(model).config_class
    assert type(vglaw.VGLAW.from_pretrained(tmp_path / name)) is type(model)  # the base class finds it
    with torch.no_grad():
        back = again(images, t["input_ids"], t["attention_mask"])
    assert back.keys() == out.keys()
    for key in out:
        torch.testing.assert_close(back[key], out[key], rtol=0, atol=0)  # the same weights, the same kernels


@pytest.mark.parametrize("name", vglaw.list_models())
def test_every_variant_is_a_typed_config_its_class_owns(name):
    """The variant's config is of its class's config type, names the variant, goes to JSON
    values and back unchanged, and refuses a field its class does not have, by name."""
    cls = VARIANTS[name][0]
    config = variant_config(name)
    assert type(config) is cls.config_class and config.variant == name
    assert type(config).from_dict(config.to_dict()) == config
    with pytest.raises(UsageError, match="no argument colour"):
        variant_config(name, colour="red")
    with pytest.raises(UsageError, match="no field colour"):
        config.replace(colour="red")
    other = next(c for c in (VARIANTS[n][0].config_class for n in VARIANTS) if c is not cls.config_class)
    with pytest.raises(UsageError, match=f"built from a {cls.config_class.__name__}"):
        cls(other())


def test_model_args_list_every_config_field_a_run_may_set():
    """`ModelArgs` (a run's typed `model.model_args`) names each field of the variants' configs
    except those the LightningModule sets itself, so a new config field cannot be forgotten
    there (LightningCLI would refuse it in a run's YAML)."""
    import dataclasses

    from vglaw.models.config import ModelArgs

    set_by_the_module = {"variant", "img_size", "text_encoder", "task", "seg_classes", "text_pretrained"}
    fields = set().union(*(VARIANTS[n][0].config_class.field_names() for n in VARIANTS))
    assert {f.name for f in dataclasses.fields(ModelArgs)} == fields - set_by_the_module
