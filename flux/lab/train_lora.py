"""A LoRA that teaches the trained proxy an instruction it does not know ("make the background
black"), and the proof that LoRAs reach the right layers: PSNR to the exact target over held-out
edits with and without the LoRA, through the product's own LoRA path (diffusers' conversion, merge).

The LoRA is trained with peft on the proxy's transformer blocks (rank 8, the rectified-flow loss the
proxy was trained with) and written in the ai-toolkit/peft layout (``transformer.*.lora_A/B``).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flux.edit import edit, encode_prompt, position_ids
from flux.lab.benchmark import psnr
from flux.lab.plans import direct, lab_plan
from flux.lab.scenes import LORA_EDITS, SIDE, make_scene
from flux.lab.train import GUIDANCE, encode_images
from flux.loading import load_components
from flux.lora import LoraState, convert

INSTRUCTION = "make the background black"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
           "proj_mlp", "proj_out", "ff.net.0.proj", "ff.net.2"]  # fmt: skip


@dataclass
class LoraTrainConfig:
    seed: int = 0
    examples: int = 2000
    steps: int = 600
    batch: int = 16
    rank: int = 8
    lr: float = 2e-3


QUICK = LoraTrainConfig(examples=16, steps=3, batch=4)


def _examples(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    scenes = [make_scene(rng) for _ in range(count)]
    return np.stack([s.image for s in scenes]), np.stack([LORA_EDITS[INSTRUCTION](s) for s in scenes])


def train_lora(weights_dir: str | Path, out_path: str | Path, config: LoraTrainConfig | None = None,
               log: Callable[[str], None] = print) -> Path:  # fmt: skip
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    config = config or LoraTrainConfig()
    torch.manual_seed(config.seed)
    c = load_components(weights_dir, torch.device("cpu"), torch.float32)
    transformer = c.transformer
    transformer.requires_grad_(False)
    inject_adapter_in_model(
        LoraConfig(r=config.rank, lora_alpha=config.rank, target_modules=TARGETS, init_lora_weights=True), transformer
    )
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    inputs, targets = _examples(np.random.default_rng(config.seed + 1000), config.examples)
    with torch.no_grad():
        x_in, x_out = encode_images(c.vae, inputs), encode_images(c.vae, targets)
        embeds, pooled, text_ids = encode_prompt(c, INSTRUCTION)
    tokens = x_out.shape[1]
    side = int(tokens**0.5)
    ids = torch.cat(
        [position_ids(side, side, 0.0, c.device, c.dtype), position_ids(side, side, 1.0, c.device, c.dtype)]
    )
    optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed + 2000)
    guidance = torch.full((config.batch,), GUIDANCE)
    transformer.train()
    start, losses = time.perf_counter(), []
    for step in range(config.steps):
        index = torch.randint(len(x_out), (config.batch,), generator=generator)
        x0, cond = x_out[index], x_in[index]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.sigmoid(torch.randn(config.batch, generator=generator))
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        prediction = transformer(
            hidden_states=torch.cat([xt, cond], dim=1), timestep=t, guidance=guidance,
            pooled_projections=pooled.expand(config.batch, -1), encoder_hidden_states=embeds.expand(config.batch, -1, -1),
            txt_ids=text_ids, img_ids=ids, return_dict=False,
        )[0][:, :tokens]  # fmt: skip
        loss = torch.nn.functional.mse_loss(prediction, noise - x0)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == config.steps - 1:
            log(
                f"lora step {step}: loss {sum(losses[-100:]) / len(losses[-100:]):.4f} ({time.perf_counter() - start:.0f}s)"
            )
    state = {f"transformer.{k}": v.detach().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        state, str(out), metadata={"training": json.dumps({**asdict(config), "seconds": time.perf_counter() - start})}
    )
    log(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) in {time.perf_counter() - start:.0f}s")
    return out


def evaluate_lora(weights_dir: str | Path, lora_path: str | Path, edits: int = 40, seed: int = 4321,
                  acceleration: str = "go fast") -> dict:  # fmt: skip
    """PSNR to the exact target for the instruction, without and with the LoRA, on held-out scenes."""
    c = load_components(weights_dir, torch.device("cpu"), torch.float32)
    lora = convert(Path(lora_path), str(lora_path), c.transformer)
    state = LoraState(c.transformer)
    inputs, targets = _examples(np.random.default_rng(seed), edits)
    rows = {"identity": [], "without_lora": [], "with_lora": []}
    samples = []
    for i, (source, target) in enumerate(zip(inputs, targets, strict=True)):
        rows["identity"].append(psnr(source, target, identical=100.0))
        outputs = {}
        for name, wanted in (("without_lora", []), ("with_lora", [(lora, 1.0)])):
            state.apply(wanted)
            image = Image.fromarray(source)
            plan = lab_plan(c, image, INSTRUCTION, SIDE, SIDE, seed=i, acceleration=acceleration)
            outputs[name] = np.asarray(edit(c, image, plan, transformer=direct(c)).image)
            rows[name].append(psnr(outputs[name], target, identical=100.0))
        if i < 4:
            samples.append({"input": source, **outputs, "target": target})
    state.apply([])
    report = {
        "instruction": INSTRUCTION,
        "edits": edits,
        "acceleration": acceleration,
        "lora_layers": len(lora.layers),
        "psnr_to_target": {k: statistics.mean(v) for k, v in rows.items()},
        "with_lora_closer_than_without": statistics.mean(
            float(w > n) for w, n in zip(rows["with_lora"], rows["without_lora"], strict=True)
        ),
    }
    return {"report": report, "samples": samples}


def write_grid(samples: list[dict], path: Path, scale: int = 3) -> Path:
    from PIL import ImageDraw

    columns = ["input", "without_lora", "with_lora", "target"]
    cell = SIDE * scale
    canvas = Image.new("RGB", (cell * len(columns), (cell + 4) * len(samples) + 18), "white")
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(columns):
        draw.text((j * cell + 4, 2), name.replace("_", " "), fill="black")
    for i, sample in enumerate(samples):
        for j, name in enumerate(columns):
            tile = Image.fromarray(sample[name]).resize((cell, cell), Image.Resampling.NEAREST)
            canvas.paste(tile, (j * cell, 18 + i * (cell + 4)))
    canvas.save(path)
    return path
