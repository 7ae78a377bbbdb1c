"""Random FLUX.1-Kontext-dev models: the tiny one in exactly the real on-disk layout, generated offline.

Same directories, file names (sharded like the real repository), config keys and
tokenizer files as the real weights, so it loads through the same code path. Sizes are
tiny, so a whole edit runs on the CPU in seconds. Deterministic from a seed.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from flux.lab import architecture as arch
from flux.weights import TREE_MANIFEST_NAME, describe_tree

TINY_TRANSFORMER = {
    "attention_head_dim": 16,
    "axes_dims_rope": [4, 6, 6],
    "joint_attention_dim": 32,
    "num_attention_heads": 2,
    "num_layers": 1,
    "num_single_layers": 1,
    "pooled_projection_dim": 32,
}
# the native side (flux.edit.base_side) the tiny model sizes its outputs from, so a test edit is
# about 256x256 rather than 1024x1024 (the size logic is the same at any side)
TINY_SIDE = 256
TINY_VAE = {"block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "norm_num_groups": 2, "sample_size": TINY_SIDE}
TINY_CLIP = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_hidden_layers": 1,
    "projection_dim": 32,
}
TINY_T5 = {"d_ff": 64, "d_kv": 16, "d_model": 32, "num_heads": 2, "num_layers": 1, "num_decoder_layers": 1}
TINY_SAFETY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_hidden_layers": 1,
    "patch_size": 32,
    "image_size": 224,
}

# Words the tiny T5 tokenizer is trained on (any text still tokenizes: unknown pieces map to <unk>).
_CORPUS = (
    "make the circle red. flip the image horizontally. invert the colours. move the square left. "
    "rotate the picture 90 degrees. change the background to blue. add a hat to the cat. "
    "turn the sky orange and make it look like a painting. a photo of a dog on the beach."
)


def write_tree_manifest(weights_dir: str | Path, description: str, **extra: object) -> Path:
    """Record a generated tree's own files, so that it is checked like the real one (``extra``:
    more of what the tree is, such as the instructions a proxy knows)."""
    manifest = describe_tree(weights_dir)
    manifest["model"] = description
    manifest.update(extra)
    manifest.pop("note", None)
    target = Path(weights_dir) / TREE_MANIFEST_NAME
    target.write_text(json.dumps(manifest, indent=2) + "\n")
    return target


def _bytes_to_unicode() -> list[str]:
    """The printable stand-ins for the 256 byte values that CLIP's byte-level BPE uses."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def write_clip_tokenizer(out: Path) -> int:
    """CLIP tokenizer files (vocab.json, merges.txt, configs) with a byte-level vocabulary."""
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars]:
        vocab[token] = len(vocab)
    merges = [("t", "h"), ("th", "e</w>"), ("i", "n"), ("o", "n</w>")]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    # the end-of-text token has the highest id: CLIP pools at the argmax of the ids
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    (out / "tokenizer.json").unlink(missing_ok=True)  # the real repository ships vocab.json + merges.txt
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return len(vocab)


def write_t5_tokenizer(out: Path, model_max_length: int = 512) -> int:
    """T5 tokenizer files (spiece.model, tokenizer.json, configs) from a small trained Unigram model."""
    import sentencepiece as spm
    from transformers import T5TokenizerFast

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS.split(". ") * 20),
        model_writer=model,
        vocab_size=80,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=100, model_max_length=model_max_length)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    (out / "spiece.model").write_bytes(model.getvalue())
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return len(tokenizer)


def _shard(directory: Path, weights_name: str, shards: int) -> None:
    """Split ``directory/weights_name`` into the real repository's numbered shards plus an index."""
    single = directory / weights_name
    state = load_file(single)
    single.unlink()
    stem = weights_name.removesuffix(".safetensors")
    names = sorted(state)
    per_shard = -(-len(names) // shards)
    weight_map = {}
    total = 0
    for n in range(shards):
        part = {k: state[k].contiguous() for k in names[n * per_shard : (n + 1) * per_shard]}
        file_name = f"{stem}-{n + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, directory / file_name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file_name))
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / f"{weights_name}.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))


# Random-weight models of three sizes, built from the real configurations:
#   tiny     every component tiny (tests, the embedded default)
#   cpu-mid  a mid-size transformer (hidden 768, 4 double + 8 single blocks) with the tiny VAE and
#            text encoders, so that the denoise loop dominates a CPU benchmark
#   full     the real architecture (12B transformer, T5-XXL, CLIP-L, the real VAE), for a GPU
PRESETS: dict[str, dict[str, dict]] = {
    "tiny": {
        "transformer": {
            **TINY_TRANSFORMER,
            "pooled_projection_dim": TINY_CLIP["hidden_size"],
            "joint_attention_dim": TINY_T5["d_model"],
        },
        "vae": TINY_VAE,
        "clip": TINY_CLIP,
        "t5": TINY_T5,
    },
    "cpu-mid": {
        "transformer": {
            "attention_head_dim": 128,
            "num_attention_heads": 6,
            "num_layers": 4,
            "num_single_layers": 8,
            "pooled_projection_dim": TINY_CLIP["hidden_size"],
            "joint_attention_dim": TINY_T5["d_model"],
        },
        "vae": TINY_VAE,
        "clip": TINY_CLIP,
        "t5": TINY_T5,
    },
    "full": {"transformer": {}, "vae": {}, "clip": {}, "t5": {}},
}


def build_models(
    preset: str, clip_vocab: int, t5_vocab: int, seed: int = 0, device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.nn.Module]:  # fmt: skip
    """Random text encoders, transformer and VAE of a preset, created directly on ``device`` in ``dtype``."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    sizes = PRESETS[preset]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(seed)
            clip = {**arch.CLIP_TEXT, **sizes["clip"]}
            clip["vocab_size"] = max(clip["vocab_size"], clip_vocab) if preset == "full" else clip_vocab
            text_encoder = CLIPTextModel(CLIPTextConfig(**clip))
            torch.manual_seed(seed + 1)
            t5 = {**arch.T5_ENCODER, **sizes["t5"]}
            t5["vocab_size"] = max(t5["vocab_size"], t5_vocab) if preset == "full" else t5_vocab
            text_encoder_2 = T5EncoderModel(T5Config(**t5))
            torch.manual_seed(seed + 2)
            transformer = FluxTransformer2DModel(**{**arch.TRANSFORMER, **sizes["transformer"]})
            torch.manual_seed(seed + 3)
            vae = AutoencoderKL(**{**arch.VAE, **sizes["vae"]})
    finally:
        torch.set_default_dtype(previous)
    models = dict(text_encoder=text_encoder, text_encoder_2=text_encoder_2, transformer=transformer, vae=vae)
    return {name: model.eval() for name, model in models.items()}


def random_components(
    preset: str, device: torch.device, dtype: torch.dtype, tokenizer_dir: str | Path, seed: int = 0
):  # fmt: skip
    """In-memory Components of a preset (for benchmarks: speed does not depend on weight values)."""
    root = Path(tokenizer_dir)
    clip_vocab = write_clip_tokenizer(root / "tokenizer")
    t5_vocab = write_t5_tokenizer(root / "tokenizer_2")
    models = build_models(preset, clip_vocab, t5_vocab, seed, device, dtype)
    return components_of(models, root, torch.device(device), dtype)


def components_of(models: dict[str, torch.nn.Module], tokenizer_dir: Path, device: torch.device, dtype: torch.dtype):
    """Components of in-memory models, with the tokenizers written under ``tokenizer_dir``."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTokenizer, T5TokenizerFast

    from flux.loading import Components, place_vae

    place_vae(models["vae"], device)
    return Components(
        **models,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir / "tokenizer"),
        tokenizer_2=T5TokenizerFast.from_pretrained(tokenizer_dir / "tokenizer_2"),
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(arch.SCHEDULER),
        device=device,
        dtype=dtype,
    )


def write_common(out: Path, seed: int = 0, safety: str = "pass", t5_max_length: int = 512) -> tuple[int, int]:
    """Everything of a tree but the four models: model_index, scheduler, tokenizers, safety checker.

    Returns the CLIP and T5 vocabulary sizes. ``safety="flag"`` makes the checker flag every image.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessorPil

    if safety not in ("pass", "flag"):
        raise ValueError(f"safety must be 'pass' or 'flag'; got {safety!r}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_index.json").write_text(json.dumps(arch.MODEL_INDEX, indent=2))
    FlowMatchEulerDiscreteScheduler.from_config(arch.SCHEDULER).save_pretrained(out / "scheduler")
    clip_vocab = write_clip_tokenizer(out / "tokenizer")
    t5_vocab = write_t5_tokenizer(out / "tokenizer_2", t5_max_length)
    torch.manual_seed(seed + 4)
    safety_config = CLIPConfig(
        text_config={**arch.SAFETY_CHECKER["text_config"], **TINY_CLIP},
        vision_config={**arch.SAFETY_CHECKER["vision_config"], **TINY_SAFETY_VISION},
        projection_dim=TINY_CLIP["projection_dim"],
    )
    checker = StableDiffusionSafetyChecker(safety_config)
    # A concept score is the cosine similarity minus the concept's threshold; a cosine is at most 1,
    # so a threshold of 2 never flags and one of -2 always does.
    threshold = 2.0 if safety == "pass" else -2.0
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(threshold)
        checker.special_care_embeds_weights.fill_(threshold)
    checker.save_pretrained(out / "safety_checker")
    CLIPImageProcessorPil(**arch.FEATURE_EXTRACTOR).save_pretrained(out / "feature_extractor")
    return clip_vocab, t5_vocab


def save_models(out: Path, models: dict[str, torch.nn.Module]) -> None:
    """The four models in the real file layout (the transformer and T5 sharded as in the real repository)."""
    models["text_encoder"].save_pretrained(out / "text_encoder")
    models["text_encoder_2"].save_pretrained(out / "text_encoder_2")
    _shard(out / "text_encoder_2", "model.safetensors", 2)
    models["transformer"].save_pretrained(out / "transformer")
    _shard(out / "transformer", "diffusion_pytorch_model.safetensors", 3)
    models["vae"].save_pretrained(out / "vae")


def make_tiny_weights(
    out_dir: str | Path, seed: int = 0, safety: str = "pass", side: int = TINY_SIDE, preset: str = "tiny"
) -> Path:
    """Write the tiny model to ``out_dir``; ``safety="flag"`` makes the safety checker flag every image;
    ``side`` is the native side its outputs are sized from (1024: the real model's sizes, slower);
    ``preset`` another size of random model in the same layout (``PRESETS``)."""
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    clip_vocab, t5_vocab = write_common(out, seed, safety)
    models = build_models(preset, clip_vocab, t5_vocab, seed)
    models["vae"].register_to_config(sample_size=side)
    save_models(out, models)
    write_tree_manifest(
        out, f"tiny random FLUX.1-Kontext-dev (seed {seed}, safety {safety}), generated by flux.lab.tiny"
    )
    return out
