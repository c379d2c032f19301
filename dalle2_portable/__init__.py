"""dalle2_portable: DALL-E 2 (unCLIP) on MLX and PyTorch from one model spec.

    import dalle2_portable as d2
    pipe = d2.load_pipeline("kakaobrain/karlo-v1-alpha", backend="auto")  # converted once, then cached
    out = pipe.generate("a corgi in a spacesuit", num_images=2, seed=0)  # out.images, out.image_embeddings
    clip = d2.load_clip("openai/clip-vit-base-patch32", backend="auto")
    d2.convert("kakaobrain/karlo-v1-alpha", "karlo")
    d2.quantize("karlo", "karlo-8bit", bits=8)  # MLX 8-bit prior and UNets, a model directory of its own
    d2.train("prior", data="shapes", out="runs/prior", model="karlo", settings=d2.TrainSettings(steps=2000))

Neither MLX nor PyTorch is imported here: a backend is imported when it is first used.
"""

__version__ = "0.1.0"  # first: the pipeline records it in every output's settings

from .backends import get_backend, installed as installed_backends
from .clip import CLIP, load_clip
from .compare import compare_backends
from .convert import convert
from .errors import Dalle2Error, Dalle2Warning
from .pipeline import Pipeline, UnCLIPOutput, load_pipeline
from .quantize import quantize
from .spec import PipelineDefaults
from . import train  # the training subpackage, callable: d2.train(...) is train.loop.train(...)
from .train.settings import TrainSettings

__all__ = ["load_pipeline", "Pipeline", "UnCLIPOutput", "PipelineDefaults", "compare_backends", "load_clip", "CLIP",
           "convert", "quantize", "train", "TrainSettings", "get_backend", "installed_backends", "Dalle2Error",
           "Dalle2Warning", "__version__"]
