"""`lcmlora distill` beside the diffusers reference recipe, same base, batch and LoRA rank, alternating.

    # CPU, the toy base (data/toy/base), batch 64, rank 16 (the issue's CPU row):
    OMP_NUM_THREADS=1 python bench/bench_reference.py
    # GPU, SD-1.5 architecture with random weights at 512 px, bf16, batch 8, rank 64:
    python bench/bench_reference.py --arch data/arch/sd15 --resolution 512 --batch 8 --rank 64 \
        --device cuda --bf16 --variant fast=optimizer=adamw_fused,sync_every=5,prefetch=2

The reference is diffusers' `examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py`.
It is never committed and never fetched by the tests: at bench time it is copied into the ignored
folder bench/.reference/ from a local diffusers clone: a checkout (`--diffusers DIR`, e.g. after
`git clone --depth 1 https://github.com/huggingface/diffusers bench/.reference/diffusers`) or a git
directory without a work tree (`--diffusers-git DIR` or $LCMLORA_DIFFUSERS_GIT, read with
`git show HEAD:examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py`).

and `PATCHES` below are applied to a copy (each printed), only so that it runs offline and
reports its step times: no tracker (tensorboard/wandb are not installed offline), a
timestamp per optimizer step, the peak CUDA memory at the end, and no save of the whole UNet
after training (outside the timed steps). Its training step itself is untouched.

What each side does per step, as users run them: the reference reads JPEG webdataset tars,
decodes and crops them in a DataLoader worker, VAE-encodes the pixels and encodes the captions
with the text encoder, then runs four UNet passes (student, teacher cond, teacher uncond, target)
with a separate frozen teacher UNet. lcmlora reads latent shards (VAE latents and prompt
embeddings precomputed once by `lcmlora encode`, not timed here), and runs three passes
(teacher cond+uncond batched, target, student) on one UNet with adapters switched off for the
teacher. Both: same images/captions (the curated toy manifest, written as clean tars for the
reference), same LoRA target modules, rank, alpha, batch, learning rate, guidance (w = scale - 1).

Each contestant runs `--rounds` times in a fresh process, in turn (ref, ours, ref, ours, ...).
Steady state: steps after `--warmup`; samples/s = batch x steps / (time of the last step report
- time of the warm-up's last). Peak memory: the child's max RSS (CPU) or max_memory_allocated
(CUDA). Ratio = lcmlora samples/s / reference samples/s (medians over rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REF_DIR = REPO / "bench" / ".reference"
REF_NAME = "train_lcm_distill_lora_sd_wds.py"
REF_PATH_IN_REPO = f"examples/consistency_distillation/{REF_NAME}"
GIT_DIR_ENV = "LCMLORA_DIFFUSERS_GIT"  # a diffusers git directory (no work tree needed)
TARGETS = ("to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2,conv1,conv2,conv_shortcut,"
           "downsamplers.0.conv,upsamplers.0.conv,time_emb_proj")

# (why, exact text in the reference script, replacement). Applied in order; each must match once.
PATCHES = [
    ("offline: no tracker (tensorboard/wandb absent)", "        log_with=args.report_to,\n",
     "        log_with=None,\n"),
    ("timing: import time", "import shutil\n", "import shutil\nimport time\n"),
    ("timing: one timestamp per optimizer step", "                global_step += 1\n",
     ("                global_step += 1\n"
      "                print(f'BENCH_STEP {global_step} {time.perf_counter()}', flush=True)\n")),
    ("memory: peak CUDA memory at the end", "    accelerator.end_training()\n",
     ("    if torch.cuda.is_available():\n"
      "        print(f'BENCH_PEAK {torch.cuda.max_memory_allocated()}', flush=True)\n"
      "    accelerator.end_training()\n")),
    ("webdataset 1.x: its tar expander also yields per-shard records without 'fname'; skip them",
     '        fname, value = filesample["fname"], filesample["data"]\n',
     ('        if "fname" not in filesample:\n            continue\n'
      '        fname, value = filesample["fname"], filesample["data"]\n')),
    ("no save of the whole UNet after training (outside the timed steps)",
     "        unet.save_pretrained(args.output_dir)\n", "        pass  # bench: full UNet not saved\n"),
]


# Where torchvision cannot be imported (this CPU box: PyPI has only CUDA builds for the installed
# CPU torch), the reference gets this stand-in: the four transforms it calls, on PIL images, as
# torchvision computes them for PIL input (PIL resize of the shorter side, crop, /255 CHW, normalize).
TV_SHIM = {
    "torchvision/__init__.py": "__version__ = '0.0.0+bench-shim'\nfrom . import transforms  # noqa\n",
    "torchvision/transforms/__init__.py": '''import enum
import torch
from . import functional  # noqa


class InterpolationMode(enum.Enum):
    NEAREST = 0
    NEAREST_EXACT = 0
    BILINEAR = 2
    BICUBIC = 3
    BOX = 4
    HAMMING = 5
    LANCZOS = 1


class RandomCrop:
    @staticmethod
    def get_params(img, output_size):
        w, h = img.size
        th, tw = output_size
        if h == th and w == tw:
            return 0, 0, h, w
        i = torch.randint(0, h - th + 1, size=(1,)).item()
        j = torch.randint(0, w - tw + 1, size=(1,)).item()
        return i, j, th, tw
''',
    "torchvision/transforms/functional.py": '''import numpy as np
import torch


def resize(img, size, interpolation=None):
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    return img.resize((new_w, new_h), interpolation.value if interpolation is not None else 2)


def crop(img, top, left, height, width):
    return img.crop((left, top, left + width, top + height))


def to_tensor(img):
    a = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float().div(255)


def normalize(t, mean, std):
    return (t - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


def pil_to_tensor(img):  # imported (not called) by transformers.image_utils
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
''',
    "torchvision/transforms/v2/__init__.py": "from . import functional  # noqa\n",
    "torchvision/transforms/v2/functional.py": "from ..functional import *  # noqa\n",
}
# With the stand-in, diffusers and transformers must still see no torchvision (they would import
# much more of it): their cached availability checks run first, then the stand-in joins sys.path
# (BENCH_TV_SHIM), and diffusers' interpolation helper is replaced by its value for 'bilinear'.
# The reference wraps teacher and target in `torch.autocast(device.type)` whatever --mixed_precision
# says: bf16 on a CPU (emulated on one without bf16 matmuls), fp16 on CUDA. The fp32 copy takes that
# away, so the ratio against it compares the same precision and the same work per step.
FP32_PATCHES = [
    ("precision: no autocast (fp32, lcmlora's precision without --bf16)",
     "        autocast_ctx = torch.autocast(accelerator.device.type)\n",
     "        autocast_ctx = nullcontext()  # bench: fp32\n"),
]
SHIM_PATCHES = [
    ("with the torchvision stand-in: library checks first, then the stand-in on sys.path",
     "import torchvision.transforms.functional as TF\n",
     ("import diffusers.utils.import_utils, transformers.utils.import_utils  # noqa\n"
      "transformers.utils.import_utils.is_torchvision_available()\n"
      "import sys; sys.path.insert(0, os.environ['BENCH_TV_SHIM'])  # noqa\n"
      "import torchvision.transforms.functional as TF\n")),
    ("with the torchvision stand-in: bilinear interpolation mode without diffusers' helper",
     "        interpolation_mode = resolve_interpolation_mode(interpolation_type)\n",
     "        interpolation_mode = transforms.InterpolationMode.BILINEAR\n"),
]


def torchvision_path(env: dict) -> str | None:
    """None when torchvision imports here; else the folder of the stand-in (written under bench/.reference)."""
    ok = subprocess.run([sys.executable, "-c", "import torchvision.transforms.functional"], env=env,
                        capture_output=True, check=False).returncode == 0
    if ok:
        return None
    root = REF_DIR / "tv_shim"
    for rel, text in TV_SHIM.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    print("  torchvision not importable: the reference uses the PIL stand-in in", root)
    return str(root)


def fetch_reference(diffusers: Path | None, diffusers_git: Path | None = None) -> Path:
    """bench/.reference/REF_NAME from a local diffusers checkout or git directory; never from the network."""
    REF_DIR.mkdir(parents=True, exist_ok=True)
    dest = REF_DIR / REF_NAME
    git_dir = diffusers_git or (Path(os.environ[GIT_DIR_ENV]) if os.environ.get(GIT_DIR_ENV) else None)
    if diffusers is not None:
        shutil.copyfile(diffusers / REF_PATH_IN_REPO, dest)
    elif git_dir is not None:
        dest.write_text(subprocess.run(["git", "-C", str(git_dir), "show", f"HEAD:{REF_PATH_IN_REPO}"], check=True,
                                       capture_output=True, text=True).stdout)
    elif not dest.exists():
        raise SystemExit(f"no {dest}: run `git clone --depth 1 https://github.com/huggingface/diffusers "
                         f"{REF_DIR}/diffusers` and pass --diffusers {REF_DIR}/diffusers (or --diffusers-git DIR, "
                         f"${GIT_DIR_ENV})")
    return dest


def patch_reference(src: Path, shim: bool, fp32: bool = False) -> Path:
    """A patched copy next to the original (`_bench_fp32` with FP32_PATCHES too); prints every patch."""
    text = src.read_text()
    for why, old, new in PATCHES + (SHIM_PATCHES if shim else []) + (FP32_PATCHES if fp32 else []):
        if text.count(old) != 1:
            raise SystemExit(f"reference patch '{why}': expected the text once, found {text.count(old)}; "
                             "the upstream script changed: update PATCHES")
        text = text.replace(old, new)
        print(f"  patch: {why}")
    out = src.with_name(src.stem + ("_bench_fp32.py" if fp32 else "_bench.py"))
    out.write_text(text)
    return out


def random_base(arch: Path, tokenizer: Path, out: Path) -> Path:
    """A diffusers SD-1.5-family folder with random weights from `arch`'s configs and a local tokenizer."""
    if (out / "model_index.json").exists():
        return out
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    UNet2DConditionModel.from_config(json.loads((arch / "unet" / "config.json").read_text())).save_pretrained(out / "unet")
    AutoencoderKL.from_config(json.loads((arch / "vae" / "config.json").read_text())).save_pretrained(out / "vae")
    CLIPTextModel(CLIPTextConfig(**json.loads((arch / "text_encoder" / "config.json").read_text()))).save_pretrained(
        out / "text_encoder")
    shutil.copytree(tokenizer, out / "tokenizer", dirs_exist_ok=True)
    shutil.copytree(arch / "scheduler", out / "scheduler", dirs_exist_ok=True)
    shutil.copyfile(arch / "model_index.json", out / "model_index.json")
    return out


def run(cmd: list[str], env: dict, log: Path) -> tuple[int, float, str]:
    """(return code, child max RSS in GiB, stdout) of one fresh process."""
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=fh, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 2**20, out


def steady(times: dict[int, float], warmup: int, steps: int, batch: int) -> float:
    """Samples/s between the report of step `warmup` and of step `warmup + steps`."""
    return batch * steps / (times[warmup + steps] - times[warmup])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=str(REPO / "data" / "toy" / "base"), help="diffusers folder (default: toy)")
    ap.add_argument("--arch", help="config folder (data/arch/sd15): random weights instead of --base")
    ap.add_argument("--tokenizer", default=str(REPO / "data" / "toy" / "base" / "tokenizer"))
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--guidance", type=float, default=2.0, help="CFG scale (reference w = scale - 1)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="mixed precision bf16 on both sides")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=key=value,key=value: an lcmlora run with distill.* overrides (default: plain)")
    ap.add_argument("--work", default="/tmp/lcmlora-bench-reference")
    ap.add_argument("--diffusers", type=Path, help="local diffusers checkout to copy the reference from")
    ap.add_argument("--diffusers-git", type=Path, help=f"a diffusers git directory (default ${GIT_DIR_ENV})")
    ap.add_argument("--json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_ours(json.loads(args.child))

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    py = sys.executable
    print("reference:", REF_DIR / REF_NAME)
    shim = torchvision_path(env)
    src = fetch_reference(args.diffusers, args.diffusers_git)
    ref_scripts = {"reference": patch_reference(src, shim is not None)}
    if not args.bf16:  # the like-for-like row: the reference in fp32 too (see FP32_PATCHES)
        ref_scripts["reference-fp32"] = patch_reference(src, shim is not None, fp32=True)
    ref_env = {**env, "BENCH_TV_SHIM": shim} if shim else env
    base = random_base(Path(args.arch), Path(args.tokenizer), work / "base") if args.arch else Path(args.base)
    base = base.resolve()

    # Data: the curated toy manifest; latent shards for lcmlora, clean JPEG tars for the reference.
    store = work / "artifacts"
    sets = [f"storage.root={store}", f"curate.source={work / 'source'}", "encode.text_embeddings=true"]
    if not (store / "encoded" / "toy.json").exists():
        t0 = time.perf_counter()
        for cmd in (["toy", "source", "--output", str(work / "source")], ["curate"], ["encode"]):
            extra = [] if cmd[0] == "toy" else [x for s in sets for x in ("--set", s)]
            subprocess.run([py, "-m", "flows.cli", *cmd, *extra], cwd=REPO, env=env, check=True,
                           capture_output=True)
        print(f"data: toy source, curated, encoded (latents + prompt embeddings) in {time.perf_counter() - t0:.0f}s")
    # curate writes its keyed folder (docs/data.md, "Output layout"): the one manifest under stages/curate/
    manifests = sorted((store / "stages" / "curate").glob("*/manifest.parquet"))
    if len(manifests) != 1:
        raise SystemExit(f"{store}/stages/curate: expected one curated manifest, found {len(manifests)}; "
                         f"remove {work} and rerun")
    shards = write_reference_shards(manifests[0], work / "source", work / "ref_tars")

    n_steps = args.warmup + args.steps
    variants = dict(v.split("=", 1) for v in args.variant) or {"plain": ""}
    ref_args = [f"--pretrained_teacher_model={base}", f"--output_dir={work / 'ref_out'}",
               f"--train_shards_path_or_url={shards}", f"--resolution={args.resolution}",
               f"--train_batch_size={args.batch}", f"--lora_rank={args.rank}", f"--lora_alpha={args.rank}",
               f"--lora_target_modules={TARGETS}", f"--max_train_steps={n_steps}",
               f"--max_train_samples={args.batch * n_steps * 4}", "--dataloader_num_workers=1",
               f"--w_min={args.guidance - 1}", f"--w_max={args.guidance - 1}", "--learning_rate=1e-4",
               "--loss_type=huber", "--num_ddim_timesteps=50", "--checkpointing_steps=1000000",
               "--validation_steps=1000000", "--seed=0", "--adam_weight_decay=1e-2",
               f"--mixed_precision={'bf16' if args.bf16 else 'no'}", "--report_to=tensorboard"]
    results: dict[str, list[dict]] = {**{k: [] for k in ref_scripts}, **{k: [] for k in variants}}
    for r in range(args.rounds):
        for ref_name, ref_script in ref_scripts.items():
            shutil.rmtree(work / "ref_out", ignore_errors=True)
            rc, rss, out = run([py, str(ref_script), *ref_args], ref_env, work / f"{ref_name}_{r}.log")
            if rc:
                raise SystemExit(f"{ref_name} failed (rc {rc}): see {work / f'{ref_name}_{r}.log'}")
            times = {int(s): float(t) for s, t in (ln.split()[1:3] for ln in out.splitlines()
                                                    if ln.startswith("BENCH_STEP"))}
            peak = [int(ln.split()[1]) / 2**30 for ln in out.splitlines() if ln.startswith("BENCH_PEAK")]
            results[ref_name].append({"samples_per_s": steady(times, args.warmup, args.steps, args.batch),
                                      "max_rss_gib": rss, "cuda_peak_gib": peak[0] if peak else None})
            print(f"round {r}: {ref_name} {results[ref_name][-1]}", flush=True)
        for name, overrides in variants.items():
            over = [f"distill.{kv}" for kv in overrides.split(",") if kv]
            spec = {"sets": sets + [f"distill.batch_size={args.batch}", f"distill.lora_rank={args.rank}",
                                    f"distill.lora_alpha={args.rank}", f"distill.max_steps={n_steps}",
                                    "distill.lr=1e-4", "distill.checkpoint_every=0", "distill.num_workers=1",
                                    f"distill.mixed_precision='{'bf16' if args.bf16 else 'no'}'",
                                    f"bases.toy.guidance_scale={args.guidance}", *over]
                    + ([f"bases.toy.reference={base}", f"bases.toy.resolution={args.resolution}"] if args.arch else []),
                    "output": str(work / f"ours_{name}"), "synthetic": bool(args.arch), "batch": args.batch}
            rc, rss, out = run([py, __file__, "--child", json.dumps(spec)], env, work / f"ours_{name}_{r}.log")
            if rc:
                raise SystemExit(f"lcmlora distill ({name}) failed (rc {rc}): see {work / f'ours_{name}_{r}.log'}")
            rec = json.loads(out.strip().splitlines()[-1])
            times = {int(k): v for k, v in rec["times"].items()}
            results[name].append({"samples_per_s": steady(times, args.warmup, args.steps, args.batch),
                                  "max_rss_gib": rss, "cuda_peak_gib": rec["cuda_peak_gib"]})
            print(f"round {r}: lcmlora {name} {results[name][-1]}", flush=True)

    import torch

    device_name = (torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine())
    ref_sps = statistics.median(x["samples_per_s"] for x in results["reference"])
    fp32_sps = (statistics.median(x["samples_per_s"] for x in results["reference-fp32"])
                if "reference-fp32" in results else None)
    print(f"\n{device_name} | base {base} | {args.resolution}px | batch {args.batch} | rank {args.rank} | "
          f"{'bf16' if args.bf16 else 'fp32'} | steady {args.steps} steps after {args.warmup} | {args.rounds} rounds")
    summary = {}
    for name, rows in results.items():
        sps = statistics.median(x["samples_per_s"] for x in rows)
        mem = max((x["cuda_peak_gib"] or x["max_rss_gib"]) for x in rows)
        summary[name] = {"samples_per_s": sps, "per_round": [x["samples_per_s"] for x in rows], "peak_gib": mem,
                         "ratio_to_reference": sps / ref_sps,
                         "ratio_to_reference_fp32": sps / fp32_sps if fp32_sps else None}
        each = ", ".join(f"{x['samples_per_s']:.2f}" for x in rows)
        fair = f", x{sps / fp32_sps:.2f} reference-fp32" if fp32_sps else ""
        print(f"{name:>14}: {sps:8.2f} samples/s (rounds {each}) | "
              f"peak {'CUDA' if rows[0]['cuda_peak_gib'] else 'RSS'} {mem:.2f} GiB | x{sps / ref_sps:.2f} reference{fair}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_name, "args": vars(args), "summary": summary,
                                               "load_avg": os.getloadavg()}, indent=2, default=str))


def write_reference_shards(manifest: Path, source: Path, out: Path) -> str:
    """The curated samples as clean img2dataset tars (KEY.jpg, KEY.txt, KEY.json); brace pattern of them."""
    import io

    import pyarrow.parquet as pq

    rows = pq.read_table(manifest, columns=["key", "caption", "shard", "member"]).to_pylist()
    out.mkdir(parents=True, exist_ok=True)
    per, n = 256, (len(rows) + 255) // 256
    if not (out / f"{n - 1:05d}.tar").exists():
        blobs: dict[tuple[str, str], bytes] = {}
        for shard in sorted({r["shard"] for r in rows}):
            with tarfile.open(source / shard) as tar:
                for m in tar:
                    if m.isfile():
                        blobs[(shard, m.name)] = tar.extractfile(m).read()
        for i in range(n):
            with tarfile.open(out / f"{i:05d}.tar", "w") as tar:
                for r in rows[i * per:(i + 1) * per]:
                    for name, data in ((f"{r['key']}.jpg", blobs[(r["shard"], r["member"])]),
                                       (f"{r['key']}.txt", r["caption"].encode()),
                                       (f"{r['key']}.json", json.dumps({"key": r["key"]}).encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
    return str(out / f"{{00000..{n - 1:05d}}}.tar")


def child_ours(spec: dict) -> None:
    """One `lcmlora distill` run (the CLI's runner, run_distill) with a timestamp per step report; JSON on stdout."""
    sys.path.insert(0, str(REPO))
    import torch

    from components.config import load_params
    from components.models.base_model import fingerprint_base, resolve_base
    from components.stages.distill import run_distill
    from components.stages.inputs import encoded_index
    from components.storage.storage import Storage

    cfg = load_params(REPO / "params.yaml", spec["sets"])
    base_name, base_cfg = resolve_base(cfg, "toy")
    times: dict[int, float] = {}

    def progress(p) -> None:
        if not p.note:
            times[p.step] = time.perf_counter()

    batches = None
    if spec["synthetic"]:  # random-weight architecture: latents/embeddings of its shapes (toy shards are 32 px)
        unet_cfg = json.loads((Path(base_cfg.reference) / "unet" / "config.json").read_text())
        vae_cfg = json.loads((Path(base_cfg.reference) / "vae" / "config.json").read_text())
        side = base_cfg.resolution // 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        g = torch.Generator().manual_seed(0)
        b = spec["batch"]
        pool = [{"latents": torch.randn(b, unet_cfg["in_channels"], side, side, generator=g),
                 "prompt_embeds": torch.randn(b, 77, unet_cfg["cross_attention_dim"], generator=g),
                 "captions": ["a photo"] * b} for _ in range(4)]

        def batches(rank: int, world_size: int):
            while True:
                yield from ({k: v.clone() if torch.is_tensor(v) else v for k, v in x.items()} for x in pool)
    shutil.rmtree(spec["output"], ignore_errors=True)
    storage = Storage.from_config(cfg.storage)
    # the shard index the encode pointer names (as the CLI's distill finds it); none for synthetic batches
    index = None if batches else encoded_index(cfg, storage, base_name)
    run_distill(cfg.distill, base=fingerprint_base(base_name, base_cfg, keep_loaded=True), storage=storage,
                latents_index=index, output=Path(spec["output"]), resolved_yaml=cfg.to_yaml(),
                params_digest=cfg.digest(), progress=progress,
                batches=batches, latents_info={"synthetic": True} if batches else None)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    print(json.dumps({"times": times, "cuda_peak_gib": peak}))


if __name__ == "__main__":
    main()
