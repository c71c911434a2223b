"""Model folders written before the models owned a typed config (commit d8dd4b0: variant and
constructor arguments attached from outside) still load, and give the outputs they gave then.

`legacy/` holds two tiny from-scratch folders saved at d8dd4b0 and their outputs on a fixed
input (`outputs.safetensors`), so a change to the loading path or to the parts' arithmetic
that alters a saved model's answers fails here.
"""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vglaw.models.config import GeneralisedScratchConfig, ScratchConfig
from vglaw.models.text_encoder import load_tokenizer
from vglaw.models.vglaw import VGLAW

LEGACY = Path(__file__).parent / "legacy"


@pytest.mark.parametrize("name, config_class", [("vglaw_tiny_scratch", ScratchConfig),
                                                 ("vglaw_tiny_scratch_gref", GeneralisedScratchConfig)])
def test_a_folder_from_before_typed_configs_loads_and_answers_as_it_did(name, config_class, tmp_path):
    model = VGLAW.from_pretrained(LEGACY / name)
    assert type(model.config) is config_class and model.config.variant == name
    assert model.source == str(LEGACY / name)
    enc = load_tokenizer(model.tokenizer_source)(["the red circle on the left", "big square"], padding=True,
                                                 return_tensors="pt")
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(images, enc["input_ids"], enc["attention_mask"])
    want = {k.split(".", 1)[1]: v for k, v in load_file(LEGACY / "outputs.safetensors").items()
            if k.split(".", 1)[0] == name}
    assert set(out) == set(want)
    for key, value in want.items():
        # float32 on possibly other kernels: a tolerance of the outputs' scale, far below a changed model
        scale = value.abs().max().item() + 1.0
        torch.testing.assert_close(out[key], value, rtol=0, atol=1e-4 * scale, msg=key)
    # Saved again, the folder's config is the typed config's fields, and it loads to the same config.
    model.save_pretrained(tmp_path / "again")
    assert VGLAW.from_pretrained(tmp_path / "again").config == model.config
