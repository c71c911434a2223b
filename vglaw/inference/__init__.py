"""From a trained model to answers: every model source loaded one way (`loading`), one answer
path (`Grounder`), the ONNX runner and exporter, the ablation of the language-adaptive weights.

    from vglaw.inference import Grounder
    g = Grounder("outputs/demo/model")            # a model folder, a hub id, a training .ckpt or .onnx
    for r in g.predict("photo.jpg", ["the dog on the left", "the man in red"]):
        r.box, r.mask, r.score                    # xyxy in original pixels, (h, w) bool, float
"""
from vglaw.inference.grounder import WORKING_SIDE, Grounder, prepare_image
from vglaw.inference.loading import available_devices, load_model, resolve_device, resolve_model

__all__ = ["WORKING_SIDE", "Grounder", "available_devices", "load_model", "prepare_image", "resolve_device",
           "resolve_model"]
