"""The one configuration source: `params.yaml`, one frozen pydantic model per section.

Every stage reads its own section. Unknown keys and wrong types raise `ConfigError` naming
the key (`distill.lr: Input should be a valid number`). `--set section.key=value` overrides
are applied before validation, so they are checked exactly like the file; an error names the
file or the `--set` expression its value came from. Numbers carry their ranges (pydantic `Field`
bounds: batch sizes and steps >= 1, rates in [0, 1]), so a zero batch fails when params load.

The file and the `--set` values are read with YAML 1.2's booleans (only true/false), as DVC reads
and rewrites params.yaml (`dvc exp run -S`, `dvc params diff`): a string setting such as
`mixed_precision: no` stays the string "no" (YAML 1.1, PyYAML's default, would make it false),
and boolean settings still accept yes/no/on/off, which pydantic reads as booleans.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

RESOLVED_CONFIG_NAME = "params.resolved.yaml"  # written beside every artifact
_BOOL = "tag:yaml.org,2002:bool"


class ConfigError(ValueError):
    """A params file or override that does not match the schema."""


class Section(BaseModel):
    """Base of every section: frozen, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())


# --- storage and registry ---------------------------------------------------------------


class StorageConfig(Section):
    root: str = "artifacts"  # local path or s3://bucket/prefix; every artifact lives under it
    endpoint_url: str | None = None  # S3 endpoint; None falls back to $AWS_ENDPOINT_URL
    region: str | None = None  # S3 region; None falls back to $AWS_DEFAULT_REGION
    retries: int = Field(3, ge=1)  # attempts for storage calls that fail with a connection error


class RegistryConfig(Section):
    root: str = "registry"  # local path or s3://bucket/prefix holding NAME/versions, NAME/aliases
    cache_dir: str = "~/.cache/lcmlora/registry"  # content-addressed cache used by `pull`


# --- bases ------------------------------------------------------------------------------


class BaseConfig(Section):
    reference: str  # diffusers folder, hub id, or single-file .safetensors
    family: Literal["sd15", "sdxl"]  # sdxl covers SSD-1B (smaller UNet, same conditioning)
    resolution: int = Field(512, ge=8)  # training and sampling resolution in pixels
    guidance_scale: float = Field(7.5, gt=0)  # the base's own CFG scale (7.5 for real SD bases)
    prediction_type: Literal["epsilon", "v_prediction"] | None = None  # None: from scheduler
    judges: str = "real"  # judges provider evaluating it (entry point in group lcmlora.judges)
    data: Literal["source", "synthesize"] = "source"  # what it distills on: the curated source, or its own samples (the synthesize stage)
    hub_id: str | None = None  # the base's Hugging Face Hub id (owner/name): the model card's base_model
    license: str | None = None  # the Hub license id of the LoRAs made for it (e.g. openrail++), on their cards
    # acceleration objectives the flows distill, gate and publish for it (NAME-lcm-lora, NAME-pcm-lora), on the
    # same curated data and latent shards; None: distill.objective alone
    objectives: list[Literal["lcm", "pcm"]] | None = Field(None, min_length=1)

    @field_validator("hub_id")
    @classmethod
    def _hub_id_is_a_repo_id(cls, value: str | None) -> str | None:
        if value is not None:
            from huggingface_hub.utils import validate_repo_id

            if value.count("/") != 1:
                raise ValueError(f"{value!r} is not a hub id: expected owner/name")
            validate_repo_id(value)  # its HFValidationError (a ValueError) names the rule
        return value


# --- stages -----------------------------------------------------------------------------


class CurateConfig(Section):
    source: str = "data/toy/source"  # LAION/img2dataset source: local dir or s3://
    metadata: str = "*.parquet"  # metadata parquet file(s) in the source, a glob relative to it
    min_aesthetic: float | None = 6.0  # LAION-Aesthetics default; None disables
    max_watermark: float | None = Field(0.5, ge=0, le=1)  # maximum pwatermark; None disables
    max_unsafe: float | None = Field(0.5, ge=0, le=1)  # maximum punsafe; None disables
    min_side: int | None = Field(None, ge=1)  # minimum shorter side in pixels; None: the base resolution
    max_aspect: float | None = Field(2.0, ge=1)  # maximum long/short side ratio; None disables
    caption_min_chars: int = Field(1, ge=0)  # shortest accepted caption
    caption_max_chars: int = Field(500, ge=1)  # longest accepted caption
    dedup: bool = True  # drop exact duplicate images (image hash)
    columns: dict[str, str] = Field(default_factory=dict)  # source column -> LAION column name
    min_rows: int = Field(100, ge=1)  # GX gate: minimum rows in the curated manifest
    max_null_rate: float = Field(0.05, ge=0, le=1)  # GX gate: largest share of nulls in optional columns (similarity)
    max_unreadable_rate: float = Field(0.01, ge=0, le=1)  # GX gate: largest share of source rows lost to corrupt shards

    @model_validator(mode="after")
    def _caption_bounds_ordered(self) -> CurateConfig:
        if self.caption_min_chars > self.caption_max_chars:
            raise ValueError(f"caption_min_chars ({self.caption_min_chars}) is above caption_max_chars "
                             f"({self.caption_max_chars}); no caption could pass")
        return self


class SynthesizeConfig(Section):
    count: int = Field(1000, ge=1)  # images to sample (the source's rows)
    batch_size: int = Field(16, ge=1)  # images per pipeline call; each batch is one tar shard (the unit a rerun resumes from)
    steps: int = Field(25, ge=1)  # sampler steps (the many-step teacher)
    scheduler: Literal["dpmsolver++", "ddim"] = "dpmsolver++"  # dpmsolver++: DPM-Solver++ (2M); ddim: DDIM
    timestep_spacing: Literal["leading", "linspace", "trailing"] | None = None  # None: the base scheduler's own
    guidance_scale: float | None = Field(None, gt=0)  # CFG scale; None: the base's guidance_scale
    seed: int = Field(0, ge=0)  # image i starts from noise seeded seed + i
    prompts: str | None = None  # prompt file, one per line (cycled); None: the captions of the curated manifest, in order
    style: str | None = None  # a style LoRA (.safetensors or LoRA folder) fused into the base before sampling; None: the base alone
    style_weight: float = Field(1.0, ge=0)  # l1 of the fused style LoRA: theta_pre + l1 * tau_style
    device: str = "cpu"  # torch device for sampling
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # pipeline dtype while sampling (fingerprints: float32)


class EncodeConfig(Section):
    output: str = "latents"  # shard root, relative to storage.root; keyed by VAE fingerprint
    batch_size: int = Field(32, ge=1)  # VAE encode batch
    shard_size: int = Field(256, ge=1)  # samples per output shard
    device: str = "cpu"  # torch device for the VAE
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # VAE dtype
    text_embeddings: bool = False  # also store KEY.emb.npy for the base's text encoder(s)
    workers: int = Field(2, ge=0)  # threads decoding and resizing images while the VAE runs
    pointers: str = "encoded"  # <pointers>/<base>.json names each base's index, relative to storage.root


class DistillConfig(Section):
    max_steps: int = Field(1000, ge=1)  # optimizer steps
    batch_size: int = Field(8, ge=1)  # per-process batch
    lr: float = Field(1e-4, gt=0)  # AdamW learning rate
    lora_rank: int = Field(64, ge=1)  # LoRA rank r
    lora_alpha: int = Field(64, gt=0)  # LoRA alpha (scale alpha / r)
    seed: int = Field(0, ge=0)  # training seed
    target_modules: list[str] = Field(default_factory=lambda: [  # module names that get LoRA (report, Table 1)
        "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
        "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"])
    lora_dropout: float = Field(0.0, ge=0, lt=1)  # dropout on the LoRA branch
    guidance_range: dict[str, tuple[float, float]] = Field(default_factory=dict)  # base -> [min, max] CFG scale drawn per sample; absent: the base's fixed guidance_scale
    num_train_timesteps: int = Field(1000, ge=1)  # T of the teacher's schedule
    num_ddim_timesteps: int = Field(50, ge=1)  # N solver timesteps; skip interval k = T / N
    timestep_scaling: float = Field(10.0, gt=0)  # c_skip/c_out use (timestep_scaling * t)
    sigma_data: float = Field(0.5, gt=0)  # s in c_skip = s^2 / ((10 t)^2 + s^2)
    objective: Literal["lcm", "pcm"] = "lcm"  # lcm: Algorithm 1 (LCD); pcm: phased consistency (distill/pcm.py)
    pcm_phases: int = Field(4, ge=1)  # pcm: phases M of the solver grid (one sampling step per phase)
    pcm_adversarial: bool = False  # pcm: the paper's adversarial consistency loss (not implemented: refused)
    loss_type: Literal["l2", "huber"] = "huber"  # distance d(.,.) of Algorithm 1
    huber_c: float = Field(0.001, gt=0)  # pseudo-Huber c
    weight_decay: float = Field(1e-2, ge=0)  # AdamW weight decay
    adam_beta1: float = Field(0.9, ge=0, lt=1)  # AdamW beta1
    adam_beta2: float = Field(0.999, ge=0, lt=1)  # AdamW beta2
    adam_eps: float = Field(1e-8, gt=0)  # AdamW epsilon
    lr_warmup_steps: int = Field(0, ge=0)  # linear warm-up, then constant
    max_grad_norm: float = Field(1.0, gt=0)  # gradient clipping (global norm)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # autocast; frozen base weights stored in this dtype
    gradient_checkpointing: bool = False  # recompute UNet activations in backward (less memory, ~30% slower)
    checkpoint_every: int = Field(500, ge=0)  # accelerate save_state every K steps (0: never)
    checkpoints_keep: int = Field(2, ge=1)  # newest checkpoints kept
    hold_file: str | None = None  # a barrier for tests: after each checkpoint, wait while this file exists
    cpu: bool = False  # force CPU even when an accelerator is present
    latents_index: str | None = None  # index.json of the latent shards, relative to storage.root; None: the one encode.pointers/BASE.json names
    num_workers: int = Field(0, ge=0)  # data loader workers
    # Speed-ups (docs/distill.md, "Speed-ups": gains and numeric bounds); off = the plain, reproducible path.
    optimizer: Literal["adamw", "adamw_fused", "adamw_8bit"] = "adamw"  # fused: one kernel per step (~1e-7 apart); 8bit: bitsandbytes (CUDA), optimizer state in 8 bits
    sync_every: int = Field(1, ge=1)  # host syncs (NaN check, loss, progress) every N steps; >1: a NaN is found up to N-1 steps late (checkpoints are always checked first)
    prefetch: int = Field(0, ge=0)  # batches read ahead by a thread, pinned on CUDA and copied without a sync (same batches, same order)
    compile_unet: bool = False  # torch.compile the UNet for teacher, target and student (minutes of compile first)
    channels_last: bool = False  # UNet weights in channels_last memory format (convolutions; numerics within float rounding)
    bf16_teacher: bool = False  # teacher and target passes under bf16 autocast while the student trains at mixed_precision


class EvaluateConfig(Section):
    steps: list[PositiveInt] = Field(default_factory=lambda: [1, 2, 4, 8], min_length=1)  # LCM step counts (teacher runs them too)
    teacher_steps: list[PositiveInt] = Field(default_factory=lambda: [25, 50])  # extra teacher-only step counts
    teacher_samplers: list[Literal["ddim", "dpmpp"]] = Field(default_factory=lambda: ["ddim", "dpmpp"])  # DDIM, DPM-Solver++(2M)
    teacher_timestep_spacing: Literal["leading", "linspace", "trailing"] | None = "trailing"  # None: the base's own
    lcm_guidance_scale: float = Field(1.0, ge=1.0, le=2.0)  # CFG scale with the LCM-LoRA (1.0: no CFG pass)
    tcd_gamma: float | None = Field(None, ge=0, le=1)  # TCDScheduler gamma; None: no TCD rows
    lcm_without_lora: bool = False  # also LCMScheduler on the teacher alone (rows lcm_base-N)
    cfg_scales: list[float] = Field(default_factory=list)  # also the student with CFG at these scales and the negative prompts (rows lcm-4-cfg3); [] none
    cfg_steps: list[PositiveInt] = Field(default_factory=lambda: [4])  # step counts of those CFG rows
    negative_prompts: str | None = None  # file, one per line: line j for prompt j, or one line for all; needed by cfg_scales
    prompts: str | None = None  # prompt file, one per line; None: the base's judges' own prompt file
    style: str | None = None  # the style the judges' style scorer measures, for judges that know several (the
    # hard toy's: blue-ruled, sepia-grid); None: the judges' default
    samples_per_prompt: int = Field(20, ge=1)  # images per prompt and method (seeds seed .. seed + N - 1 per prompt)
    seed: int = Field(0, ge=0)  # first noise seed; every method gets the same initial noise
    batch_size: int = Field(50, ge=1)  # images per pipeline call
    device: str = "cpu"  # torch device for sampling and metrics
    agreement_reference: str = "ddim-50"  # teacher run whose images PSNR/SSIM compare against
    feature_extractor: str | None = None  # local TorchScript Inception (FID) file, needed for real bases
    reference_images: str | None = None  # FD reference image folder; None: the judges' own (real: needed)
    clip_model: str | None = None  # local CLIP folder (CLIPModel + processor), needed for real bases
    # gate: thresholds; None switches one off (it is then listed as skipped, never as passed)
    lcm4_fd_max_ratio_to_teacher50: float | None = Field(1.3, gt=0)  # FD(lcm-4) <= ratio * best teacher FD at 50 steps
    gate_teacher_steps: PositiveInt = 50  # the teacher step count both ratio thresholds compare against (hard toy: 25)
    lcm4_fd_below_dpm4: bool = True  # FD(lcm-4) <= FD(dpmpp-4)
    adherence_min_ratio: float | None = Field(0.9, ge=0)  # adherence(lcm-4) >= ratio * best teacher adherence at 50 steps
    # adherence(lcm-2) >= ratio * best teacher adherence at gate_teacher_steps; off unless set (the hard toy: on a
    # good base LCMScheduler alone reads well at 4 steps, and a distilled LoRA shows at 2)
    lcm2_adherence_min_ratio: float | None = Field(None, ge=0)
    lcm1_psnr_min: float | None = None  # PSNR(lcm-1 vs agreement_reference) minimum in dB
    # PSNR(lcm-2 vs agreement_reference) minimum in dB: how closely 2 LCM steps follow the teacher's own
    # trajectory from the same noise, what consistency distillation trains (the hard toy: a 10-step LoRA
    # reads like a good one on adherence, not here)
    lcm2_psnr_min: float | None = None
    # for a PCM-LoRA, PSNR(pcm-2 vs agreement_reference) minimum in dB in place of lcm2_psnr_min; None: that
    # judges it. PCM samples at its phase edges, which follow the teacher closely even barely trained (the
    # hard toy: a 10-step PCM-LoRA reads 21.9 dB, good ones 25.5-25.9; LCM's 10-step 20.1, good 21.9-23.2)
    pcm2_psnr_min: float | None = None

    @model_validator(mode="after")
    def _cfg_rows_have_negatives(self) -> EvaluateConfig:
        if self.cfg_scales and not self.negative_prompts:
            raise ValueError("evaluate.cfg_scales needs evaluate.negative_prompts (a file, one negative prompt per line)")
        return self


class MergeConfig(Section):
    weights: list[tuple[NonNegativeFloat, NonNegativeFloat]] = Field(default_factory=lambda: [(0.8, 1.0)], min_length=1)  # (l1, l2) grid
    lcm_steps: int = Field(4, ge=1)  # LCMScheduler steps of every merged variant
    lcm_guidance_scale: float = Field(1.0, ge=1.0, le=2.0)  # CFG with the LCM-LoRA (1.0: no CFG pass)
    reference_steps: int = Field(25, ge=1)  # the style LoRA alone: DPM-Solver++ steps, CFG at the base's guidance
    samples_per_prompt: int = Field(10, ge=1)  # images per prompt and variant (same noise for every variant)
    seed: int = Field(0, ge=0)  # first noise seed
    svd_rank: int | None = Field(None, ge=1)  # also evaluate an SVD-compressed merged LoRA at this rank; None: skip
    min_style_retention: float = 0.8  # rule: style strength >= this x the style LoRA's own (25-step); retention (1 - FD ratio) may be negative
    min_adherence: float = Field(0.8, ge=0)  # rule: digit accuracy (toy) / CLIP score (real) at least this
    select_by: Literal["style_retention", "fd", "adherence"] = "fd"  # best passing (l1, l2) by (fd: closest to the style reference)
    save_fused: Literal["best", "all", "none"] = "best"  # fused checkpoints to write (diffusers + single file)
    style_file: str = "data/toy/style_lora/pytorch_lora_weights.safetensors"  # default --style
    # where no (l1, l2) passes: distill: an LCM-LoRA distilled for base + style fused at synthesize.style_weight,
    # on its own samples (synthesize.count), published as the style variant (docs/style_variants.md); none: no variant
    fallback: Literal["distill", "none"] = "distill"


class PublishConfig(Section):
    name: str | None = None  # registry name; None: "<base>-lcm-lora"
    alias: str = "candidate"  # alias moved to the new version after a passing gate


class OrchestrateConfig(Section):
    results: str = "prefect-results"  # Prefect task results and cache records, relative to storage.root
    accelerate_config: str | None = None  # distill under `accelerate launch` with this file (infra/accelerate/); None: in-process
    retries: int = Field(3, ge=0)  # retries of storage and network tasks (exponential backoff)
    retry_delay_s: float = Field(5.0, ge=0)  # first retry delay; doubles each retry
    encode_timeout_s: int = Field(4 * 3600, ge=1)  # per-task wall-clock limits (Prefect timeout_seconds)
    distill_timeout_s: int = Field(24 * 3600, ge=1)
    evaluate_timeout_s: int = Field(4 * 3600, ge=1)
    merge_timeout_s: int = Field(4 * 3600, ge=1)
    toy_source_if_missing: bool = True  # nightly writes the toy source first when curate.source is the toy dir and empty
    dvc_push: bool = False  # nightly ends with `dvc push` (serialized per repo) when the repo has a DVC remote
    torch_threads: int | None = Field(None, ge=1)  # intra-op CPU threads for the stage tasks; None: torch's default (one per core)
    fan_out: Literal["auto", "deployment", "in-process"] = "auto"  # auto: one base-deployment run per base when
    # the nightly itself runs from a deployment and `base_deployment` exists; else the bases run in-process, in order
    base_deployment: str = "base-pipeline/base-pipeline"  # FLOW/DEPLOYMENT the nightly fans out to
    max_parallel_bases: int = Field(2, ge=1)  # the base deployment's Prefect concurrency limit (runs at a time)
    base_retries: int = Field(2, ge=0)  # reruns of a crashed base run (worker lost); distill resumes from checkpoints
    base_poll_s: float = Field(2.0, gt=0)  # how often the nightly polls the base runs' states
    base_heartbeat_timeout_s: float | None = Field(120.0, gt=0)  # a Running base run without a Prefect flow-run heartbeat
    # for this long lost its worker: marked Crashed, then retried (base-pipeline sends one every 30 s)


# --- root -------------------------------------------------------------------------------


class Params(Section):
    storage: StorageConfig = StorageConfig()
    registry: RegistryConfig = RegistryConfig()
    bases: dict[str, BaseConfig] = Field(default_factory=dict)
    toy: dict[str, Any] = Field(default_factory=dict)  # opaque here; components/toy/config.py checks it
    curate: CurateConfig = CurateConfig()
    synthesize: SynthesizeConfig = SynthesizeConfig()
    encode: EncodeConfig = EncodeConfig()
    distill: DistillConfig = DistillConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    merge: MergeConfig = MergeConfig()
    publish: PublishConfig = PublishConfig()
    orchestrate: OrchestrateConfig = OrchestrateConfig()

    def base(self, name: str) -> BaseConfig:
        """The `bases.NAME` entry, or a ConfigError listing the known names."""
        if name not in self.bases:
            known = ", ".join(sorted(self.bases)) or "none"
            raise ConfigError(f"bases.{name}: no such base in params (known: {known})")
        return self.bases[name]

    def digest(self) -> str:
        """sha256 of the resolved config, for cache keys and lineage."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=2)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class _Yaml12BoolLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans: true/false only; yes/no/on/off stay strings.

    DVC dumps params.yaml with ruamel.yaml in YAML 1.2, which needs no quotes around "no", so
    `dvc exp run -S` turns `mixed_precision: "no"` into `mixed_precision: no`; read as YAML 1.1
    that is false ("Input should be 'no', 'fp16' or 'bf16'")."""


_Yaml12BoolLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12BoolLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _load_yaml(text: str) -> Any:
    """Parse params YAML as DVC does (YAML 1.2 booleans, see `_Yaml12BoolLoader`)."""
    return yaml.load(text, Loader=_Yaml12BoolLoader)  # a SafeLoader subclass: safe


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Apply one `section.key=value` override in place; the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected section.key=value")
    dotted, raw = override.split("=", 1)
    keys = [k for k in dotted.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"--set {override!r}: empty key")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {override!r}: {key} is not a section")
        node = child
    node[keys[-1]] = _load_yaml(raw) if raw.strip() else None


def _override_keys(override: str) -> tuple[str, ...]:
    return tuple(k for k in override.split("=", 1)[0].strip().split(".") if k)


def _exists(tree: Any, keys: tuple[Any, ...]) -> bool:
    for key in keys:
        if not isinstance(tree, dict) or str(key) not in tree:
            return False
        tree = tree[str(key)]
    return True


def _origin(loc: tuple[Any, ...], file_tree: dict[str, Any], overrides: list[str], source: str) -> str:
    """Where the value at `loc` came from: the last `--set` that wrote it (or created the section
    holding it), else the params file."""
    path = tuple(str(p) for p in loc)
    for override in reversed(overrides):
        keys = _override_keys(override)
        if path[:len(keys)] == keys:  # the override set this value or one of its parents
            return f"--set {override!r}"
        if keys[:len(path)] == path:  # a check of a whole section the override wrote into
            return f"{source} with --set {override!r}"
        common = 0
        while common < min(len(keys), len(path)) and keys[common] == path[common]:
            common += 1
        if common and not _exists(file_tree, path[:common]):  # it created the section holding the value
            return f"--set {override!r}"
    return source


def _format_errors(source: str, err: ValidationError, file_tree: dict[str, Any] | None = None,
                   overrides: list[str] | None = None) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(root)"
        msg = "unknown key; remove it or fix its spelling" if e["type"] == "extra_forbidden" else e["msg"]
        origin = _origin(e["loc"], file_tree or {}, overrides or [], source)
        lines.append(f"{origin}: {key}: {msg}")
    return "\n".join(lines)


def parse_params(tree: dict[str, Any], source: str = "params") -> Params:
    """Validate a params tree; ConfigError names every bad key."""
    try:
        return Params.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(source, err)) from None


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read params.yaml, apply `--set` overrides, validate; each error names the file or the
    `--set` its value came from."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found; pass --params FILE")
    file_tree = _load_yaml(path.read_text()) or {}
    if not isinstance(file_tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    tree = copy.deepcopy(file_tree)
    for override in overrides or []:
        apply_override(tree, override)
    try:
        return Params.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(str(path), err, file_tree, list(overrides or []))) from None
