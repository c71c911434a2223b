"""Fine-tuning: a configured model starts from a trained model's weights (`model.init_from`),
with parts kept fixed (`model.freeze`)."""
from __future__ import annotations

from torch import nn

from vglaw.errors import UsageError
from vglaw.models.vglaw import VGLAW

FREEZABLE = ("text", "backbone", "aggregator", "weight_generator", "box_head", "mask_head")
# Config fields a fine-tuned model may set apart from the model it starts from: sizes of its own
# data (seg_classes), caches, regularisation, provenance, and the generalised heads it adds.
FREE_FIELDS = {"variant", "seg_classes", "text_cache_size", "drop_path_rate", "text_pretrained", "centre_dim"}


def initialise_from(model: VGLAW, source: str) -> str:
    """Load the weights of the trained model at `source` (a model folder or hub id) into
    `model`, and say in one line what was loaded, what starts fresh and what was left out.

    The trained model must be of the configured model's class, or of the class a generalised or
    describing one extends (its weights then start the extended model, whose added heads train
    from their initialisation), with the same architecture.

    Raises:
        UsageError: another kind of model, another architecture (fields or tensor shapes).
    """
    if str(source).endswith(".ckpt"):
        raise UsageError(f"model.init_from {source}: a training checkpoint; make it a model folder first (`vglaw "
                         f"export {source} --out FOLDER`), or resume the run itself with --ckpt_path")
    trained = VGLAW.from_pretrained(source)
    src, dst = type(trained), type(model)
    extends = issubclass(dst, src) and ((dst.generalised and not src.generalised)
                                        or (dst.describes and not src.describes))
    if not (src is dst or extends):
        raise UsageError(f"model.init_from {source} is a {src.__name__} ({trained.config.variant or 'no variant'}) "
                         f"but the configured model is a {dst.__name__} ({model.config.variant}): fine-tune the "
                         f"same variant" + (", or its generalised or describing form" if not src.generalised else ""))
    mine, theirs = model.config.to_dict(), trained.config.to_dict()
    differ = sorted(k for k in mine.keys() & theirs.keys() if k not in FREE_FIELDS and mine[k] != theirs[k])
    if differ:
        raise UsageError(f"model.init_from {source} was built with other settings than the configured model: " +
                         ", ".join(f"{k} {theirs[k]!r} there, {mine[k]!r} here" for k in differ))
    state, own = trained.state_dict(), model.state_dict()
    # the category classifier is sized by each dataset's categories: another count starts it fresh
    state = {k: v for k, v in state.items() if not (k.startswith("mask_head.seg.") and k in own
                                                    and v.shape != own[k].shape)}
    shapes = [f"{k} {tuple(state[k].shape)} there, {tuple(own[k].shape)} here" for k in state
              if k in own and state[k].shape != own[k].shape]
    if shapes:
        raise UsageError(f"model.init_from {source} does not fit the configured model: " + "; ".join(shapes[:6]))
    fresh = sorted({k.split(".")[0] + "." + k.split(".")[1] for k in own.keys() - state.keys()})
    unused = sorted({k.split(".")[0] + "." + k.split(".")[1] for k in state.keys() - own.keys()})
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    loaded = len(state.keys() & own.keys())
    return (f"model.init_from {source}: {loaded} of {len(own)} tensors loaded" +
            (f"; starting fresh: {', '.join(fresh)}" if fresh else "") +
            (f"; not used: {', '.join(unused)}" if unused else ""))


def freeze(model: VGLAW, parts: list[str]) -> list[nn.Module]:
    """Keep `parts` of the model fixed (no gradients); returns their modules, which training
    keeps in eval mode too (BatchNorm statistics and dropout fixed as well).

    Raises:
        UsageError: a part the model does not have.
    """
    modules = []
    for name in parts:
        module = getattr(model, name, None) if name in FREEZABLE else None
        if module is None:
            raise UsageError(f"model.freeze: {name!r} is not a part of {type(model).__name__}; parts: "
                             f"{', '.join(n for n in FREEZABLE if getattr(model, n, None) is not None)}")
        module.requires_grad_(False)
        modules.append(module)
    return modules
