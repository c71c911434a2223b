"""The describing head: decoding, speaker-listener choice, saving, training and its metrics."""
import json
import shutil

import numpy as np
import pytest
import torch

from vglaw.cli import main
from vglaw.models.decoding import beam_search, sample
from vglaw.models.loading import create_model


@pytest.fixture(scope="module")
def describer64():
    """The tiny describing model in float64, with a random (untrained, so varied) decoder."""
    torch.manual_seed(0)
    model = create_model("vglaw_tiny_scratch_describe").double().eval()
    for p in model.describer.parameters():  # larger weights: decoding far from uniform, away from ties
        p.data.normal_(0, 0.3)
    return model


def _memory(model, n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    images = torch.randn(n, 3, 64, 64, generator=g, dtype=torch.float64).to(dtype)
    corner = torch.rand(n, 2, generator=g, dtype=torch.float64).to(dtype) * 0.5
    boxes = torch.cat([corner, corner + 0.3], dim=1)
    with torch.no_grad():
        return model.describe_memory(images, boxes)


def test_beam_search_is_batch_independent_and_sorted(describer64):
    memory = _memory(describer64, 3)
    together = beam_search(describer64.describer, memory, 101, 102, beams=3, max_len=8)
    for b in range(3):
        alone = beam_search(describer64.describer, memory[b : b + 1], 101, 102, beams=3, max_len=8)[0]
        assert [c.ids for c in alone] == [c.ids for c in together[b]]
        assert np.allclose([c.log_prob for c in alone], [c.log_prob for c in together[b]], atol=1e-9)
    for cands in together:
        probs = [c.log_prob for c in cands]
        assert probs == sorted(probs, reverse=True) and len({c.ids for c in cands}) == len(cands)
        assert all(len(c.ids) >= 1 and 102 not in c.ids for c in cands)  # no empty expression, no end token


def test_beam_search_log_prob_is_the_decoders(describer64):
    """The reported log probability is the sum of the decoder's token log probabilities."""
    memory = _memory(describer64, 1)
    best = beam_search(describer64.describer, memory, 101, 102, beams=2, max_len=6)[0][0]
    ids = torch.tensor([[101, *best.ids, 102][:6]])
    with torch.no_grad():
        logp = describer64.describer(memory, ids[:, :-1]).log_softmax(-1)[0]  # (T, V)
    total = float(logp.gather(1, ids[0, 1:, None]).sum())
    assert best.log_prob == pytest.approx(total, abs=1e-9)


def test_sampling_is_deterministic_for_a_seed_and_batch_independent(describer64):
    memory = _memory(describer64, 2)
    a = sample(describer64.describer, memory, 101, 102, samples=4, max_len=6, seed=3)
    b = sample(describer64.describer, memory, 101, 102, samples=4, max_len=6, seed=3)
    alone = sample(describer64.describer, memory[1:], 101, 102, samples=4, max_len=6, seed=3)
    other = sample(describer64.describer, memory, 101, 102, samples=4, max_len=6, seed=4)
    assert a == b
    assert [c.ids for c in alone[0]] == [c.ids for c in a[1]]
    assert a != other


def test_grounding_is_unchanged_by_a_describing_head():
    """A describing model holding a grounding model's weights grounds exactly as it does."""
    torch.manual_seed(0)
    plain = create_model("vglaw_tiny_scratch").eval()
    describing = create_model("vglaw_tiny_scratch_describe").eval()
    missing, unexpected = describing.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("locator.", "describer.")) for k in missing)
    images = torch.randn(2, 3, 64, 64)
    ids = torch.tensor([[101, 1996, 2417, 4418, 102], [101, 1996, 2300, 102, 0]])
    mask = (ids > 0).long()
    with torch.no_grad():
        a, b = plain(images, ids, mask), describing(images, ids, mask)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_describing_head_saves_and_loads_with_the_model_folder(describer64, tmp_path):
    from vglaw.models.vglaw import VGLAW

    model = describer64.float()
    try:
        model.save_pretrained(tmp_path / "m")
        config = json.loads((tmp_path / "m" / "config.json").read_text())
        assert config["model_class"] == "DescribingScratchVGLAW" and config["describe_dim"] == 32
        loaded = VGLAW.from_pretrained(tmp_path / "m")
        assert type(loaded).__name__ == "DescribingScratchVGLAW" and loaded.describes
        state = model.state_dict()
        assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
        memory = _memory(model.float(), 1)
        mine = beam_search(model.describer, memory, 101, 102, 2, 6)
        theirs = beam_search(loaded.describer, memory, 101, 102, 2, 6)
        assert [c.ids for c in mine[0]] == [c.ids for c in theirs[0]]
    finally:
        describer64.double()


def test_choose_keeps_what_the_listener_grounds_back():
    from vglaw.inference.describing import choose

    ious, log_probs = [0.2, 0.91, 0.7], [-1.0, -3.0, -2.0]
    assert choose(ious, log_probs, rerank=True) == 2  # both 0.91 and 0.7 refer: the likelier of them
    assert choose(ious, log_probs, rerank=False) == 0
    assert choose([0.3, 0.45, 0.1], [-1.0, -3.0, -0.5]) == 1  # none refers: the closest
    assert choose([0.45, 0.45, 0.1], [-3.0, -2.0, -0.5]) == 1  # equally close: the likelier


def test_check_boxes_names_the_bad_box():
    from vglaw.errors import UsageError
    from vglaw.inference.describing import check_boxes

    assert check_boxes([[0, 0, 10, 5]], (5, 10)) == [[0.0, 0.0, 10.0, 5.0]]
    with pytest.raises(UsageError, match="zero area"):
        check_boxes([[3, 3, 3, 8]], (20, 20))
    with pytest.raises(UsageError, match="outside the 20x10 image"):
        check_boxes([[0, 0, 21, 5]], (10, 20))
    with pytest.raises(UsageError, match="at least one box"):
        check_boxes([], (10, 10))


def test_speaker_listener_on_a_real_grounding(describer64):
    """Every candidate is grounded by the model; rerank keeps the likeliest that refers (else the
    closest), no rerank the likeliest; the reported IoU is the chosen one's."""
    from vglaw.inference import Grounder

    model = describer64.float()
    try:
        g = Grounder(model)
        image = (np.random.default_rng(0).random((48, 80, 3)) * 255).astype(np.uint8)
        boxes = [[4, 4, 30, 40], [40, 8, 78, 46]]
        for rerank in (True, False):
            for d in g.describe(image, boxes, candidates=4, rerank=rerank):
                assert len(d.candidates) >= 1 and d.reranked == rerank
                refer = [c for c in d.candidates if c.listener_iou >= 0.5]
                if rerank and refer:
                    assert d.listener_iou >= 0.5 and d.log_prob == max(c.log_prob for c in refer)
                elif rerank:
                    assert d.listener_iou == max(c.listener_iou for c in d.candidates)
                else:
                    assert d.log_prob == max(c.log_prob for c in d.candidates)
                chosen = next(c for c in d.candidates if c.text == d.text and c.log_prob == d.log_prob)
                assert chosen.listener_iou == d.listener_iou and chosen.grounded_box == d.grounded_box
                if d.grounded_box is not None:  # the listener IoU is the grounded box's, recomputed here
                    from torchvision.ops import box_iou

                    iou = float(box_iou(torch.tensor([d.box]), torch.tensor([d.grounded_box]))[0, 0])
                    assert d.listener_iou == pytest.approx(iou, abs=1e-3)
    finally:
        describer64.double()


def test_shapes_checks_resolve_the_generated_sentence():
    from vglaw.inference.describe_eval import shapes_checks

    objects = [{"kind": "circle", "color": "red", "size": "big", "cx": 10.0, "cy": 10.0},
               {"kind": "circle", "color": "blue", "size": "big", "cx": 60.0, "cy": 12.0},
               {"kind": "star", "color": "red", "size": "small", "cx": 30.0, "cy": 50.0}]
    assert shapes_checks("the red circle", objects, 0) == (True, True)
    assert shapes_checks("the circle", objects, 0) == (True, False)  # two circles: ambiguous
    assert shapes_checks("the leftmost circle", objects, 0) == (True, True)
    assert shapes_checks("the red circle", objects, 2) == (True, False)  # another object
    assert shapes_checks("red the circle", objects, 0) == (False, False)


def test_training_a_describing_head_leaves_grounding_fixed(shapes_root, tmp_path):
    """From a grounding model folder, with every grounding part frozen: no grounding loss is
    computed, only the describing head changes, and the next-token loss falls."""
    import pytorch_lightning as pl

    from vglaw.data.datamodule import ReferDataModule
    from vglaw.training.module import VGLAWModule

    torch.manual_seed(0)
    create_model("vglaw_tiny_scratch").save_pretrained(tmp_path / "ground")
    pl.seed_everything(0)
    dm = ReferDataModule(dataset="shapes", data_root=str(shapes_root), img_size=64, batch_size=8, num_workers=0,
                         flip_p=0.0)
    module = VGLAWModule(variant="vglaw_tiny_scratch_describe", img_size=64, init_from=str(tmp_path / "ground"),
                         freeze=["text", "backbone", "aggregator", "weight_generator", "box_head", "mask_head"],
                         weight_describe=1.0, weight_locate=0.5, lr_other=3e-3, warmup_steps=0, milestones=[100])
    assert not module.trains_grounding
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        first = float(module._describe_losses(batch)["describe"])
    trainer = pl.Trainer(max_steps=12, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(module, dm)
    after = module.model.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"locator", "describer"}
    module.eval()
    with torch.no_grad():
        assert float(module._describe_losses(batch)["describe"]) < first


def test_describe_command_refuses_bad_boxes_and_models(tiny_ckpt, shapes_root, tmp_path, capsys):
    image = next((shapes_root / "images" / "shapes").glob("test_*.png"))
    torch.manual_seed(0)
    folder = tmp_path / "describing"
    create_model("vglaw_tiny_scratch_describe").save_pretrained(folder)

    def error(argv, *needles):
        assert main(["describe", *argv]) == 2
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("vglaw describe: error:")]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert all(n in lines[0] for n in needles), (needles, lines)

    error(["--model", str(folder), "--image", str(image), "--box", "0,0,500,20"], "outside")
    error(["--model", str(folder), "--image", str(image), "--box", "5,5,5,20"], "zero area")
    error(["--model", str(folder), "--image", str(image), "--box", "1,2,3"], "four numbers")
    error(["--model", str(tiny_ckpt), "--image", str(image), "--box", "1,2,30,40"], "no describing head")
    out = tmp_path / "o.png"
    assert main(["describe", "--model", str(folder), "--image", str(image), "--box", "2,2,40,40",
                 "--candidates", "2", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert out.is_file() and len(report["results"]) == 1 and len(report["results"][0]["candidates"]) == 2


needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="the caption metrics run Java (METEOR, PTB)")


@needs_java
def test_expression_metrics_equal_pycocoevalcap_and_count_each_region_once():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from vglaw.training.describe_metrics import ExpressionMetrics

    refs = {0: ["the red circle", "the small red circle"], 1: ["the star left of the blue square"],
            2: ["the big green triangle at the top", "the topmost triangle"]}
    cands = {0: "the red circle", 1: "the big star left of the square", 2: "the green triangle"}
    metric = ExpressionMetrics()
    metric.update(torch.tensor([0, 1]), [cands[0], cands[1]], [refs[0], refs[1]], torch.tensor([0.9, 0.3]),
                  unique=torch.tensor([True, False]), grammatical=torch.tensor([True, True]))
    # region 1 again, as a distributed sampler's padding repeats it: counted once, first kept
    metric.update(torch.tensor([2, 1]), [cands[2], "something else"], [refs[2], ["x"]], torch.tensor([0.6, 0.0]),
                  unique=torch.tensor([True, True]), grammatical=torch.tensor([True, False]))
    got = metric.compute()

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": r} for r in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": c}] for k, c in cands.items()})
    expected = {"bleu4": Bleu(4).compute_score(gts, res, verbose=0)[0][3],
                "meteor": Meteor().compute_score(gts, res)[0], "rouge_l": Rouge().compute_score(gts, res)[0],
                "cider_d": Cider().compute_score(gts, res)[0]}
    for k, v in expected.items():
        assert float(got[k]) == pytest.approx(v, abs=1e-12), k
    assert float(got["n"]) == 3
    assert float(got["listener_acc"]) == pytest.approx(2 / 3)  # IoU 0.9 and 0.6 reach 0.5; 0.3 does not
    assert float(got["unique_acc"]) == pytest.approx(2 / 3) and float(got["grammatical"]) == 1.0
    # a hand case: the candidate equal to a reference scores 1 on BLEU-4 and ROUGE-L by itself
    same = ExpressionMetrics()
    same.update(torch.tensor([0]), ["the small red circle"], [["the small red circle"]], torch.tensor([1.0]))
    scores = same.compute()
    assert float(scores["bleu4"]) == pytest.approx(1.0, abs=1e-6) and float(scores["rouge_l"]) == 1.0


@pytest.mark.parametrize("name", ["describe_shapes", "describe_refcocog"])
def test_describe_configs_parse(name, tmp_path, capsys):
    from pathlib import Path

    config = Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml"
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(config), f"--data.data_root={tmp_path}", "--print_config"])
    printed = capsys.readouterr().out
    assert exit_.value.code == 0 and "_describe" in printed and "weight_describe: 1.0" in printed


def test_serve_describe_mode_clicks_regions_and_answers(shapes_root, tmp_path):
    """The page's describe handler (`vglaw.commands.serve.describe`) and its two-click regions,
    without the browser; bad regions are messages."""
    import threading

    from vglaw.commands.serve import add_corner, describe
    from vglaw.errors import UserError
    from vglaw.inference import Grounder

    regions, pending = add_corner("", None, (30, 5))
    assert regions == "" and pending == [30, 5]
    regions, pending = add_corner(regions, pending, (4, 40))
    assert regions == "4,5,30,40" and pending is None
    regions, _ = add_corner(regions, *add_corner(regions, None, (50, 50))[1:], (60, 62))
    assert regions.splitlines() == ["4,5,30,40", "50,50,60,62"]

    torch.manual_seed(0)
    grounder, lock = Grounder(create_model("vglaw_tiny_scratch_describe")), threading.Lock()
    image = str(sorted((shapes_root / "images" / "shapes").glob("test_*.png"))[0])
    overlay, report = describe(grounder, lock, image, regions, 2)
    assert [r["box"] for r in report["results"]] == [[4, 5, 30, 40], [50, 50, 60, 62]]
    assert all(len(r["candidates"]) == 2 and 0 <= r["listener_iou"] <= 1 for r in report["results"])
    with pytest.raises(UserError, match="outside"):
        describe(grounder, lock, image, "0,0,9999,10", 2)
    with pytest.raises(UserError, match="expected x1,y1,x2,y2"):
        describe(grounder, lock, image, "1,2,3", 2)
    with pytest.raises(UserError, match="click two corners"):
        describe(grounder, lock, image, "", 2)
