"""The backend-neutral model spec: one frozen dataclass per component config, the pipeline's defaults
(`PipelineDefaults`), and the model directory's index (`ModelSpec`).

Every size a module uses comes from these configs. Each config has exactly one translator from the reference
library's `config.json` (`from_hf_config`), and every quirk of that format is handled and commented there.
`to_dict` / `from_dict` are the JSON forms written to `model.json`; `from_dict` is strict, so a typo in a
hand-edited `model.json` is an error, not a silently ignored key.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import Dalle2Error
from .paths import relative_path
from .schema import check_fields, expect_object

FORMAT = 1  # model.json "format"; bump on any incompatible change of the layout below


class _Config:
    """JSON in and out for the frozen config dataclasses below."""

    TYPE: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "model.json"):
        expect_object(d, where)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise Dalle2Error(f"{where}: unknown key {unknown[0]!r} in a {cls.TYPE} config; "
                              f"known keys are {sorted(names)}")
        check_fields(cls, d, where)  # types and ranges first: the checks in __post_init__ may compute with them
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kwargs)


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


def unsupported(key: str, value: Any, where: str, supported) -> Dalle2Error:
    """The one-line error for a config value we do not implement."""
    return Dalle2Error(f"{where}: unsupported {key}={value!r}; supported: {', '.join(map(repr, supported))}")


ACTIVATIONS = ("quick_gelu", "gelu")  # the CLIP activations we implement (transformers' ACT2FN names)


def _check_transformer(cfg, where: str) -> None:
    if cfg.hidden_act not in ACTIVATIONS:
        raise unsupported("hidden_act", cfg.hidden_act, where, ACTIVATIONS)
    if cfg.hidden_size % cfg.num_attention_heads:
        raise Dalle2Error(f"{where}: hidden_size {cfg.hidden_size} is not divisible by "
                          f"num_attention_heads {cfg.num_attention_heads}")


class _CLIPTower(_Config):
    """What the two CLIP tower configs share: the transformer checks and the head size."""

    WHERE: ClassVar[str]

    def __post_init__(self):
        _check_transformer(self, self.WHERE)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class CLIPTextConfig(_CLIPTower):
    """transformers `CLIPTextConfig` (defaults are transformers 5's) + the projection of `...WithProjection`."""

    TYPE: ClassVar[str] = "clip_text"
    WHERE: ClassVar[str] = "text encoder config"
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    # Which token is pooled: the legacy value 2 (all OpenAI-derived configs) means "argmax of the ids", any other
    # value means "first position of this id" (transformers PR #24773). See `pool_positions` in backends.
    eos_token_id: int = 49407

    @classmethod
    def from_hf_config(cls, d: dict[str, Any], projection_dim: int | None = None) -> CLIPTextConfig:
        """From a transformers `CLIPTextConfig` dict (see `_clip_tower_from_hf`)."""
        return _clip_tower_from_hf(cls, d, "text_config_dict", projection_dim)


@dataclass(frozen=True)
class CLIPVisionConfig(_CLIPTower):
    """transformers `CLIPVisionConfig` + the projection of `CLIPVisionModelWithProjection`."""

    TYPE: ClassVar[str] = "clip_vision"
    WHERE: ClassVar[str] = "image encoder config"
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512

    def __post_init__(self):
        super().__post_init__()
        if self.image_size % self.patch_size:
            raise Dalle2Error(f"image encoder config: image_size {self.image_size} is not a multiple of "
                              f"patch_size {self.patch_size}")

    @property
    def num_positions(self) -> int:  # patches + the class token
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_hf_config(cls, d: dict[str, Any], projection_dim: int | None = None) -> CLIPVisionConfig:
        """From a transformers `CLIPVisionConfig` dict (see `_clip_tower_from_hf`)."""
        return _clip_tower_from_hf(cls, d, "vision_config_dict", projection_dim)


def _clip_tower_from_hf(cls, d: dict[str, Any], legacy_key: str, projection_dim: int | None):
    """One CLIP tower config from its transformers dict. Quirks handled here:
    - configs saved by transformers 4.16 (the openai/clip-* repos) carry both a full dump and a
      `*_config_dict` with the real non-default values; transformers lets the `_dict` form win, so do we;
    - a full `CLIPModel` builds both projections with its top-level `projection_dim` (the towers' own values
      are ignored there), so its converter passes that one in."""
    d = {**d, **(d.get(legacy_key) or {})}
    kw = _pick(cls, d)
    if projection_dim is not None:
        kw["projection_dim"] = projection_dim
    return cls(**kw)


def _pick(cls, d: dict[str, Any]) -> dict[str, Any]:
    """The keys of `d` that are fields of `cls` (HF configs carry many unrelated generation/label keys)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass(frozen=True)
class ImageProcessorConfig(_Config):
    """transformers `CLIPImageProcessor` settings: resize shortest side, centre crop, rescale, normalise."""

    TYPE: ClassVar[str] = "image_processor"
    do_resize: bool = True
    shortest_edge: int = 224
    resample: int = 3  # PIL.Image.Resampling code; 3 = BICUBIC
    do_center_crop: bool = True
    crop_height: int = 224
    crop_width: int = 224
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> ImageProcessorConfig:
        """From `preprocessor_config.json`, in either the legacy (`"size": 224`, `"crop_size": 224`, as in the
        openai repos) or the current (`{"shortest_edge": 224}`, `{"height": 224, "width": 224}`) form."""
        kw = _pick(cls, d)
        size = d.get("size", 224)
        if isinstance(size, dict):
            if "shortest_edge" not in size:
                raise unsupported("size", size, "preprocessor_config.json", ["{'shortest_edge': N}"])
            size = size["shortest_edge"]
        kw["shortest_edge"] = int(size)
        crop = d.get("crop_size", 224)
        if isinstance(crop, dict):
            kw["crop_height"], kw["crop_width"] = int(crop["height"]), int(crop["width"])
        else:
            kw["crop_height"] = kw["crop_width"] = int(crop)
        for key in ("image_mean", "image_std"):
            if key in kw:
                kw[key] = tuple(float(x) for x in kw[key])
        return cls(**kw)


@dataclass(frozen=True)
class TokenizerConfig(_Config):
    """How the files in `tokenizer/` are read. `kind` is "clip_bpe" (vocab.json + merges.txt, or tokenizer.json)
    or "sentencepiece" (tokenizer.model)."""

    TYPE: ClassVar[str] = "tokenizer"
    kind: str = "clip_bpe"
    max_length: int = 77
    # The padding token differs per repo: "<|endoftext|>" in openai/clip-*, "!" (id 0) in Karlo.
    pad_token: str = "<|endoftext|>"

    def __post_init__(self):
        if self.kind not in ("clip_bpe", "sentencepiece"):
            raise unsupported("tokenizer kind", self.kind, "model.json", ["clip_bpe", "sentencepiece"])


# -- unCLIP (diffusers) components ---------------------------------------------------------------------------

def _only(d: dict[str, Any], key: str, default: Any, supported: tuple, where: str) -> Any:
    """The value of `key` (diffusers' default when absent), which must be one of `supported`."""
    value = d.get(key, default)
    if value not in supported:
        raise unsupported(key, value, where, supported)
    return value


@dataclass(frozen=True)
class PriorConfig(_Config):
    """diffusers `PriorTransformer` in the configuration Karlo uses (reference karlo-v1-alpha.md section 3).

    Token sequence: [text states (num_embeddings), text embedding, time embedding, x_t, prd] -> the prd token's
    output is the predicted CLIP image embedding. Sizes resolved from diffusers' `None` defaults are stored
    resolved, so the dataclass alone says every shape."""

    TYPE: ClassVar[str] = "prior"
    num_attention_heads: int = 32
    attention_head_dim: int = 64
    num_layers: int = 20
    embedding_dim: int = 768  # x_t and text-state width (proj_in, encoder_hidden_states_proj inputs)
    num_embeddings: int = 77  # text tokens
    additional_embeddings: int = 4  # text embedding, time, x_t, prd
    time_embed_dim: int = 2048  # diffusers: None -> inner_dim
    embedding_proj_dim: int = 768  # width of proj_embedding (the CLIP text embedding); None -> embedding_dim
    clip_embed_dim: int = 768  # output width; None -> embedding_dim

    def __post_init__(self):
        if self.additional_embeddings != 4:
            # 4 is what the 4 appended tokens fill exactly; other values make diffusers pad the positional
            # embedding (fewer) or leave it longer than the sequence (more): not used by any model we convert.
            raise unsupported("additional_embeddings", self.additional_embeddings, "prior config", (4,))

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def sequence_length(self) -> int:
        return self.num_embeddings + self.additional_embeddings

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> PriorConfig:
        """From diffusers' `prior/config.json`. Quirks handled here:
        - Karlo's file (diffusers 0.11) predates the keys below; diffusers fills its defaults, which are Karlo's
          architecture, so absence means the default. Any other value of these architecture switches is an
          error: `time_embed_act_fn` (SiLU), `norm_in_type` / `embedding_proj_norm_type` (no LayerNorm),
          `encoder_hid_proj_type` (a Linear on the text states), `added_emb_type` (the learned prd token);
        - `time_embed_dim`, `embedding_proj_dim`, `clip_embed_dim` may be null, meaning inner_dim, embedding_dim
          and embedding_dim (diffusers `PriorTransformer.__init__`);
        - `dropout` only acts in training; inference ignores it."""
        where = "prior config.json"
        _only(d, "time_embed_act_fn", "silu", ("silu",), where)
        _only(d, "norm_in_type", None, (None,), where)
        _only(d, "embedding_proj_norm_type", None, (None,), where)
        _only(d, "encoder_hid_proj_type", "linear", ("linear",), where)
        _only(d, "added_emb_type", "prd", ("prd",), where)
        _only(d, "additional_embeddings", 4, (4,), where)
        kw = {k: d[k] for k in ("num_attention_heads", "attention_head_dim", "num_layers", "embedding_dim",
                                "num_embeddings") if k in d}
        base = cls(**kw)
        return dataclasses.replace(
            base,
            time_embed_dim=d.get("time_embed_dim") or base.inner_dim,
            embedding_proj_dim=d.get("embedding_proj_dim") or base.embedding_dim,
            clip_embed_dim=d.get("clip_embed_dim") or base.embedding_dim,
        )


@dataclass(frozen=True)
class TextProjConfig(_Config):
    """diffusers `UnCLIPTextProjModel` (reference section 4): CLIP embeddings -> the decoder's extra time
    embedding and its extra context tokens. diffusers has no switches here, only sizes."""

    TYPE: ClassVar[str] = "text_proj"
    clip_embeddings_dim: int = 768
    time_embed_dim: int = 1280  # the decoder's time embedding width (4 x its first block's channels)
    cross_attention_dim: int = 1536  # the decoder's context width
    clip_extra_context_tokens: int = 4

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> TextProjConfig:
        """From diffusers' `text_proj/config.json`; `time_embed_dim` and `cross_attention_dim` have no default in
        diffusers (keyword-only, required), so a file without them is an error here too."""
        for key in ("time_embed_dim", "cross_attention_dim"):
            if key not in d:
                raise Dalle2Error(f"text_proj config.json: missing required key {key!r}")
        return cls(**_pick(cls, d))


# diffusers' own defaults for what both UNet classes share (a key a config.json leaves out means these)
_HF_UNET_DEFAULTS = dict(sample_size=None, flip_sin_to_cos=True, freq_shift=0, layers_per_block=2,
                         mid_block_scale_factor=1.0, norm_num_groups=32, norm_eps=1e-5,
                         resnet_time_scale_shift="default")


@dataclass(frozen=True)
class _UNetConfig(_Config):
    """What the two diffusers UNets share (decoder and super-res): sizes and time conditioning, here with the
    values both of Karlo's UNets have. Block types are diffusers' names (in the subclasses);
    `modules.unet.unet_blocks` turns a config into per-block channel plans."""

    DOWN: ClassVar[tuple[str, ...]]  # the block types we implement, per position
    MID: ClassVar[tuple[str, ...]]
    UP: ClassVar[tuple[str, ...]]
    WHERE: ClassVar[str]
    HF_DEFAULTS: ClassVar[dict[str, Any]]
    block_out_channels: tuple[int, ...] = (320, 640, 960, 1280)
    layers_per_block: int = 3
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    mid_block_scale_factor: float = 1.0
    time_embed_dim: int = 1280  # diffusers: time_embedding_dim, None -> 4 x block_out_channels[0]

    def __post_init__(self):
        n = len(self.block_out_channels)
        for key, types, allowed in (("down_block_types", self.down_block_types, self.DOWN),
                                    ("up_block_types", self.up_block_types, self.UP)):
            if len(types) != n:
                raise Dalle2Error(f"{self.WHERE}: {key} has {len(types)} entries but block_out_channels has {n}")
            for t in types:
                if t not in allowed:
                    raise unsupported(key, t, self.WHERE, allowed)
        if self.mid_block_type not in self.MID:
            raise unsupported("mid_block_type", self.mid_block_type, self.WHERE, self.MID)
        if self.resnet_time_scale_shift not in ("default", "scale_shift"):
            raise unsupported("resnet_time_scale_shift", self.resnet_time_scale_shift, self.WHERE,
                              ("default", "scale_shift"))
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise Dalle2Error(f"{self.WHERE}: block_out_channels {c} is not divisible by norm_num_groups "
                                  f"{self.norm_num_groups}")

    @property
    def downscale(self) -> int:
        """Input height and width must be multiples of this (one halving per downsampling block)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def _common_from_hf(cls, d: dict[str, Any], where: str) -> dict[str, Any]:
        """The fields of `cls` from a diffusers config.json, absent keys taking diffusers' defaults (HF_DEFAULTS,
        which are not Karlo's values), and the switches both UNet classes must have at diffusers' defaults."""
        _only(d, "act_fn", "silu", ("silu",), where)
        _only(d, "center_input_sample", False, (False,), where)
        _only(d, "time_embedding_type", "positional", ("positional",), where)
        _only(d, "num_class_embeds", None, (None,), where)
        for key in ("layers_per_block", "norm_num_groups"):
            if not isinstance(d.get(key, 2), int):  # diffusers also takes per-block lists / None: no unCLIP model does
                raise unsupported(key, d[key], where, ["one int"])
        kw = {**cls.HF_DEFAULTS, **_pick(cls, d)}
        for key in ("block_out_channels", "down_block_types", "up_block_types"):
            kw[key] = tuple(kw[key])
        kw["time_embed_dim"] = d.get("time_embedding_dim") or 4 * kw["block_out_channels"][0]  # diffusers' rule
        return kw


@dataclass(frozen=True)
class UNet2DConditionConfig(_UNetConfig):
    """diffusers `UNet2DConditionModel` as Karlo's decoder configures it (reference karlo-v1-alpha.md section 5):
    ResNet blocks that resample themselves, SimpleCrossAttn blocks (keys and values = the context tokens through
    add_k/add_v, then the feature map itself), the CLIP time embedding added as an "identity" class embedding,
    scale-shift time conditioning, 6 output channels (epsilon and the learned variance)."""

    TYPE: ClassVar[str] = "unet2d_condition"
    WHERE: ClassVar[str] = "decoder config"
    DOWN: ClassVar[tuple[str, ...]] = ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D")
    MID: ClassVar[tuple[str, ...]] = ("UNetMidBlock2DSimpleCrossAttn",)
    UP: ClassVar[tuple[str, ...]] = ("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D")
    HF_DEFAULTS: ClassVar[dict[str, Any]] = dict(  # diffusers `UNet2DConditionModel.__init__` defaults
        _HF_UNET_DEFAULTS, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=1280,
        attention_head_dim=8, class_embed_type=None)
    in_channels: int = 3
    out_channels: int = 6
    down_block_types: tuple[str, ...] = ("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3
    mid_block_type: str = "UNetMidBlock2DSimpleCrossAttn"
    up_block_types: tuple[str, ...] = ("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",)
    resnet_time_scale_shift: str = "scale_shift"
    sample_size: int | None = 64
    attention_head_dim: int = 64  # for SimpleCrossAttn blocks this is the head SIZE: heads = channels // 64
    cross_attention_dim: int = 1536  # context width (text_proj's output)
    class_embed_type: str | None = "identity"  # "identity": class_labels (B, time_embed_dim) add to the time emb

    def __post_init__(self):
        super().__post_init__()
        if self.class_embed_type not in (None, "identity"):
            raise unsupported("class_embed_type", self.class_embed_type, self.WHERE, (None, "identity"))
        for c in self.block_out_channels:
            if c % self.attention_head_dim:
                raise Dalle2Error(f"{self.WHERE}: block_out_channels {c} is not divisible by attention_head_dim "
                                  f"{self.attention_head_dim}")

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> UNet2DConditionConfig:
        """From diffusers' `decoder/config.json`. Quirks handled here:
        - Karlo's file (diffusers 0.11) predates most switches of today's class; absent means diffusers' default,
          and any switch that would change the network is accepted only at the value Karlo has;
        - `mid_block_type` absent means diffusers' default `UNetMidBlock2DCrossAttn`, which we do not implement;
        - `attention_head_dim` must be one int (a per-block list is a later diffusers form no unCLIP model uses);
          `num_attention_heads` must be null (diffusers then uses attention_head_dim, as for Karlo);
        - `dropout` acts only in training; `use_linear_projection`, `upcast_attention`, `downsample_padding`,
          `transformer_layers_per_block` are not read by the block types we implement."""
        where = "decoder config.json"
        for key, default, ok in (
                ("class_embed_type", None, (None, "identity")), ("dual_cross_attention", False, (False,)),
                ("only_cross_attention", False, (False,)), ("mid_block_only_cross_attention", None, (None, False)),
                ("addition_embed_type", None, (None,)), ("encoder_hid_dim", None, (None,)),
                ("encoder_hid_dim_type", None, (None,)), ("time_cond_proj_dim", None, (None,)),
                ("timestep_post_act", None, (None,)), ("time_embedding_act_fn", None, (None,)),
                ("conv_in_kernel", 3, (3,)), ("conv_out_kernel", 3, (3,)), ("class_embeddings_concat", False, (False,)),
                ("cross_attention_norm", None, (None,)), ("resnet_skip_time_act", False, (False,)),
                ("resnet_out_scale_factor", 1.0, (1.0,)), ("num_attention_heads", None, (None,)),
                ("projection_class_embeddings_input_dim", None, (None,))):
            _only(d, key, default, ok, where)
        _only(d, "mid_block_type", "UNetMidBlock2DCrossAttn", cls.MID, where)
        if not isinstance(d.get("attention_head_dim", 8), int):
            raise unsupported("attention_head_dim", d["attention_head_dim"], where, ["one int"])
        return cls(**cls._common_from_hf(d, where))


@dataclass(frozen=True)
class UNet2DConfig(_UNetConfig):
    """diffusers `UNet2DModel` as Karlo's super-res UNets configure it (reference section 6): ResNet blocks only
    (no attention anywhere), positional time embedding, input = noisy 256 px image and the upsampled 64 px one."""

    TYPE: ClassVar[str] = "unet2d"
    WHERE: ClassVar[str] = "super-res config"
    DOWN: ClassVar[tuple[str, ...]] = ("ResnetDownsampleBlock2D",)
    MID: ClassVar[tuple[str, ...]] = ("UNetMidBlock2D",)
    UP: ClassVar[tuple[str, ...]] = ("ResnetUpsampleBlock2D",)
    HF_DEFAULTS: ClassVar[dict[str, Any]] = dict(  # diffusers `UNet2DModel.__init__` defaults
        _HF_UNET_DEFAULTS, in_channels=3, out_channels=3, block_out_channels=(224, 448, 672, 896),
        down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * 3, mid_block_type="UNetMidBlock2D",
        up_block_types=("AttnUpBlock2D",) * 3 + ("UpBlock2D",))
    in_channels: int = 6
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("ResnetDownsampleBlock2D",) * 4
    mid_block_type: str = "UNetMidBlock2D"
    up_block_types: tuple[str, ...] = ("ResnetUpsampleBlock2D",) * 4
    resnet_time_scale_shift: str = "default"
    sample_size: int | None = 256  # null in Karlo's super_res_last (harmless: the pipeline reads the first's)

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> UNet2DConfig:
        """From diffusers' `super_res_*/config.json`. `add_attention` defaults to true in diffusers (a mid-block
        attention we do not implement), so it must be present and false, as in Karlo's files; `class_embed_type`
        must be null; `mid_block_type` absent means "UNetMidBlock2D"; `attention_head_dim`, `downsample_type`,
        `upsample_type` and `attn_norm_num_groups` are not read by the ResNet-only blocks we implement."""
        where = "super-res config.json"
        _only(d, "add_attention", True, (False,), where)
        _only(d, "class_embed_type", None, (None,), where)
        _only(d, "mid_block_type", "UNetMidBlock2D", cls.MID, where)
        return cls(**cls._common_from_hf(d, where))


PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")  # diffusers' names; UnCLIPScheduler has the first two


@dataclass(frozen=True)
class SchedulerConfig(_Config):
    """diffusers `UnCLIPScheduler` (reference karlo-v1-alpha.md section 7): the squared-cosine schedule of
    `num_train_timesteps` steps, what the model predicts, how the variance is chosen, and the x0 clipping."""

    TYPE: ClassVar[str] = "unclip_scheduler"
    num_train_timesteps: int = 1000
    variance_type: str = "fixed_small_log"  # or "learned_range" (the decoder's 6-channel output)
    prediction_type: str = "epsilon"  # or "sample" (x0; Karlo's prior) or "v_prediction" (Salimans & Ho 2022)
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    beta_schedule: str = "squaredcos_cap_v2"  # the only one UnCLIPScheduler has

    def __post_init__(self):
        for key, ok in (("variance_type", ("fixed_small_log", "learned_range")),
                        ("prediction_type", PREDICTION_TYPES), ("beta_schedule", ("squaredcos_cap_v2",))):
            if getattr(self, key) not in ok:
                raise unsupported(key, getattr(self, key), "scheduler config", ok)

    @classmethod
    def from_hf_config(cls, d: dict[str, Any], where: str = "scheduler_config.json") -> SchedulerConfig:
        """From a diffusers `scheduler_config.json` of class UnCLIPScheduler (absent keys: diffusers' defaults,
        which are this dataclass's)."""
        name = d.get("_class_name", "UnCLIPScheduler")
        if name != "UnCLIPScheduler":
            raise unsupported("_class_name", name, where, ("UnCLIPScheduler",))
        kw = _pick(cls, d)
        try:
            return cls(**kw)
        except Dalle2Error as e:
            raise Dalle2Error(f"{where}: {e}") from None


# -- the pipeline's defaults ---------------------------------------------------------------------------------

STAGES = ("prior", "decoder", "super_res")  # the cascade's sampling stages, in order
STAGE_OPTIONS = ("steps", "guidance", "sampler")  # the options a stage may have (Stage's fields)
# a PipelineDefaults field's type by its name's last word: (stored as, accepted, in an error)
_DEFAULT_KINDS = {"steps": (int, numbers.Integral, "an integer"), "size": (int, numbers.Integral, "an integer"),
                  "guidance": (float, numbers.Real, "a finite number"),
                  "scale": (float, numbers.Real, "a finite number"),
                  "sampler": (str, str, "a sampler name")}


@dataclass(frozen=True)
class PipelineDefaults(_Config):
    """What a verb uses for each option the call leaves out: model.json's "defaults".

    A stage has exactly the options that are fields `{stage}_{option}` here: the super-res stage has no guidance
    (Karlo's upsamplers are unconditional on text). The values below are diffusers' `UnCLIPPipeline` and
    `UnCLIPImageVariationPipeline` `__call__` defaults (identical from v0.11 to today; reference sections 11-12),
    which are Karlo's and are in none of its files; guidance 1 turns classifier-free guidance off. A sample size
    of None means the stage's UNet config's `sample_size`, as in diffusers."""

    TYPE: ClassVar[str] = "defaults"
    prior_steps: int = 25
    prior_guidance: float = 4.0
    prior_sampler: str = "ancestral"
    decoder_steps: int = 25
    decoder_guidance: float = 8.0
    decoder_sampler: str = "ancestral"
    super_res_steps: int = 7
    super_res_sampler: str = "ancestral"
    decoder_sample_size: int | None = None
    super_res_sample_size: int | None = None
    clip_logit_scale: float | None = None  # CLIPModel's learned temperature, recorded by CLIP conversions

    def __post_init__(self):
        # Types only (a call's options land here too): sampler names and step ranges are the schedule's checks,
        # made when a stage is built. Integers and numbers are stored as Python int and float.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.default is None:
                continue
            kind, accepted, what = _DEFAULT_KINDS[f.name.rsplit("_", 1)[1]]
            if isinstance(value, bool) or not isinstance(value, accepted):
                raise Dalle2Error(f"{f.name} must be {what}, got {value!r}")
            if kind is float and not math.isfinite(value):
                raise Dalle2Error(f"{f.name} must be a finite number, got {value!r}")
            object.__setattr__(self, f.name, kind(value))

    @classmethod
    def options(cls, stage: str) -> tuple[str, ...]:
        """The options `stage` has, in STAGE_OPTIONS' order: ("steps", "sampler") for super_res."""
        names = {f.name for f in dataclasses.fields(cls)}
        return tuple(k for k in STAGE_OPTIONS if f"{stage}_{k}" in names)

    def stage(self, stage: str) -> dict[str, Any]:
        """One stage's settings by option name, e.g. {"steps": 7, "sampler": "ancestral"} for super_res."""
        return {k: getattr(self, f"{stage}_{k}") for k in self.options(stage)}

    def override(self, stages: tuple[str, ...], options: dict[str, Any]) -> PipelineDefaults:
        """These defaults with a call's stage options ({stage}_{option}, None = keep the default) for the named
        stages; any other option, such as one a stage does not have, is an error naming the ones there are."""
        allowed = sorted(f"{s}_{k}" for s in stages for k in self.options(s))
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise Dalle2Error(f"unknown option {unknown[0]!r} here; the options are {', '.join(allowed)}")
        return dataclasses.replace(self, **{k: v for k, v in options.items() if v is not None})


# component type -> its config class
COMPONENT_TYPES: dict[str, type[_Config]] = {
    c.TYPE: c for c in (CLIPTextConfig, CLIPVisionConfig, PriorConfig, TextProjConfig, UNet2DConditionConfig,
                        UNet2DConfig)
}

# The canonical component names of a model directory, in the order of the flow.
COMPONENT_NAMES = ("text_encoder", "image_encoder", "prior", "text_proj", "decoder", "super_res_first",
                   "super_res_last")


@dataclass(frozen=True)
class Source:
    """Where a model directory came from: a Hub repo id or a local path, its revision, and its layout."""

    repo: str
    revision: str | None = None
    layout: str = "transformers-clip"


QUANTIZED_BITS = (4, 8)
QUANTIZED_GROUP_SIZES = (32, 64, 128)  # MLX's affine group sizes
QUANTIZED_GROUP_SIZE = 32  # the default: 8-bit at 32 keeps the default model's images >= 30 dB PSNR (64: 29.0 dB)
QUANTIZED_MODES = ("affine",)
QUANTIZABLE_TYPES = ("prior", "unet2d_condition", "unet2d")  # the prior and the UNets; CLIP and text_proj stay


@dataclass(frozen=True)
class Quantization(_Config):
    """How a component's weights are stored quantised (`dalle2 quantize`, quantize.py): MLX's affine group-wise
    quantisation (`mx.quantize`), `bits` per weight, one float32 scale and bias per `group_size` consecutive
    weights of a row. Which layers are quantised follows from this alone: every Linear and Conv2d whose row
    (in_features, or kH*kW*in_channels) is a multiple of group_size (quantize.py `quantizable`), except the
    module paths in `keep`, which stay float (by default the layers outside the repeated blocks: the input and
    output layers and the time embedding)."""

    TYPE: ClassVar[str] = "quantization"
    bits: int = 8
    group_size: int = QUANTIZED_GROUP_SIZE
    mode: str = "affine"
    keep: tuple[str, ...] = ()

    def __post_init__(self):
        for key, ok in (("bits", QUANTIZED_BITS), ("group_size", QUANTIZED_GROUP_SIZES), ("mode", QUANTIZED_MODES)):
            value = getattr(self, key)
            if isinstance(value, bool) or value not in ok:
                raise Dalle2Error(f"quantization {key} {value!r} is not supported; choose one of "
                                  f"{', '.join(map(str, ok))}")
        object.__setattr__(self, "keep", tuple(self.keep))

    def describe(self) -> str:
        kept = f", {len(self.keep)} layers float" if self.keep else ""
        return f"{self.bits}-bit, group {self.group_size} ({self.mode}{kept})"


@dataclass(frozen=True)
class Component:
    type: str
    config: Any  # one of COMPONENT_TYPES' classes
    weights: str  # file name inside the model directory
    quantization: Quantization | None = None  # weights stored quantised (model.json "quantization"), or float

    def __post_init__(self):
        if self.quantization is not None and self.type not in QUANTIZABLE_TYPES:
            raise Dalle2Error(f"a {self.type} component cannot be quantized; only the prior and the UNets "
                              f"({', '.join(QUANTIZABLE_TYPES)}) can")

    def to_dict(self) -> dict[str, Any]:
        d = {"type": self.type, "config": self.config.to_dict(), "weights": self.weights}
        if self.quantization is not None:
            d["quantization"] = self.quantization.to_dict()
        return d

    @classmethod
    def from_dict(cls, name: str, d: dict[str, Any]) -> Component:
        where = f"model.json component {name!r}"
        missing = [k for k in ("type", "config", "weights") if k not in d]
        if missing:
            raise Dalle2Error(f"{where}: missing key {missing[0]!r}; re-convert the model with `dalle2 convert`")
        unknown = sorted(set(d) - {"type", "config", "weights", "quantization"})
        if unknown:
            raise Dalle2Error(f"{where}: unknown key {unknown[0]!r}; known keys are config, quantization, type, "
                              "weights")
        if not isinstance(d["type"], str) or d["type"] not in COMPONENT_TYPES:
            raise unsupported("type", d["type"], where, sorted(COMPONENT_TYPES))
        config = COMPONENT_TYPES[d["type"]].from_dict(d["config"], where)
        quantization = None
        if d.get("quantization") is not None:
            try:
                quantization = Quantization.from_dict(d["quantization"], f"{where} \"quantization\"")
            except Dalle2Error as e:
                msg = str(e)
                raise Dalle2Error(msg if msg.startswith(where) else f"{where}: {msg}") from None
        try:
            return cls(d["type"], config, relative_path(d["weights"], f"{where} \"weights\""), quantization)
        except Dalle2Error as e:
            msg = str(e)
            raise Dalle2Error(msg if msg.startswith(where) else f"{where}: {msg}") from None


@dataclass(frozen=True)
class ModelSpec:
    """The content of `model.json`: everything needed to build every component, nothing about a backend."""

    source: Source
    components: dict[str, Component]
    tokenizer: TokenizerConfig | None = None
    image_processor: ImageProcessorConfig | None = None
    schedulers: dict[str, SchedulerConfig] = field(default_factory=dict)  # prior / decoder / super_res
    defaults: PipelineDefaults = field(default_factory=PipelineDefaults)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "source": dataclasses.asdict(self.source),
            "components": {k: c.to_dict() for k, c in self.components.items()},
            "tokenizer": self.tokenizer.to_dict() if self.tokenizer else None,
            "image_processor": self.image_processor.to_dict() if self.image_processor else None,
            "schedulers": {k: s.to_dict() for k, s in self.schedulers.items()},
            "defaults": self.defaults.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        fmt = d.get("format")
        if fmt != FORMAT:
            raise Dalle2Error(f"model.json: unknown format {fmt!r} (this version reads format {FORMAT}); "
                              "re-convert the model with `dalle2 convert` or upgrade dalle2_portable")
        for key in ("source", "components"):
            if key not in d:
                raise Dalle2Error(f"model.json: missing key {key!r}; re-convert the model with `dalle2 convert`")
        source = expect_object(d["source"], "model.json \"source\"")
        if "repo" not in source:
            raise Dalle2Error("model.json \"source\": missing key 'repo'; re-convert the model with `dalle2 convert`")
        unknown = sorted(set(source) - {f.name for f in dataclasses.fields(Source)})
        if unknown:
            raise Dalle2Error(f"model.json \"source\": unknown key {unknown[0]!r}; re-convert the model with "
                              "`dalle2 convert`")
        check_fields(Source, source, "model.json \"source\"")
        source = Source(**source)
        components = {k: Component.from_dict(k, expect_object(c, f"model.json component {k!r}"))
                      for k, c in expect_object(d["components"], "model.json \"components\"").items()}
        for name in components:
            if name not in COMPONENT_NAMES:
                raise unsupported("component name", name, "model.json", COMPONENT_NAMES)
        tok = d.get("tokenizer")
        proc = d.get("image_processor")
        schedulers = expect_object(d.get("schedulers") or {}, "model.json \"schedulers\"")
        return cls(
            source=source,
            components=components,
            tokenizer=TokenizerConfig.from_dict(tok) if tok else None,
            image_processor=ImageProcessorConfig.from_dict(proc) if proc else None,
            schedulers={k: SchedulerConfig.from_dict(s, f"model.json scheduler {k!r}")
                        for k, s in schedulers.items()},
            defaults=PipelineDefaults.from_dict(d.get("defaults") or {}),
        )
