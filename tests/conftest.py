import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Model folders that tests write are remembered here, not in the user's ~/.cache/vglaw.
os.environ["VGLAW_HOME"] = tempfile.mkdtemp(prefix="vglaw-home-")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer():
    from vglaw.models.text_encoder import load_tokenizer

    return load_tokenizer("minilm")


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory):
    """A tiny shapes dataset: 16 train, 5 val (an odd count, so DDP pads) and 4 test images."""
    from vglaw.data.shapes import generate

    root = tmp_path_factory.mktemp("shapes")
    generate(root, seed=1, splits={"train": 16, "val": 5, "test": 4}, progress=False)
    return root


TINY_ARGS = dict(variant="vglaw_tiny", img_size=64, warmup_steps=2, milestones=[100])


@pytest.fixture(scope="session")
def tiny_ckpt(shapes_root, tmp_path_factory):
    """A checkpoint of the tiny model after a few training steps on the tiny shapes set."""
    import pytorch_lightning as pl

    from vglaw.data.datamodule import ReferDataModule
    from vglaw.training.module import VGLAWModule

    pl.seed_everything(0)
    out = tmp_path_factory.mktemp("ckpt")
    dm = ReferDataModule(dataset="shapes", data_root=str(shapes_root), img_size=64, batch_size=4, num_workers=0)
    module = VGLAWModule(**TINY_ARGS, lr_other=1e-2)
    trainer = pl.Trainer(max_steps=3, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, default_root_dir=out)
    trainer.fit(module, dm)
    path = out / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path
